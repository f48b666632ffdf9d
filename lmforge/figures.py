"""Pictures of a model's scores and of its training, as images on its MLflow runs.

DVC plots (dvc.yaml) draw the same data from reports/evaluate/<task>/ for `dvc plots show`; these are the
MLflow UI's copies, where a person comparing runs looks: the confusion matrix, ROC and precision-recall
curves of a classifier (one class against the rest), and the validation loss of a training run by step.
Drawn with matplotlib's object API: no pyplot state, no display needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_CONFUSION_LABELS = 40  # a tagger's tag set fits; past that a matrix is unreadable anyway
MAX_CURVES = 10  # ROC and PR curves per class up to this many classes; a micro-average beyond


def _figure(width: float = 5.5, height: float = 4.5) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def confusion_figure(pairs: Sequence[dict[str, str]], labels: Sequence[str], title: str) -> Figure:
    """Counts of (actual, predicted) pairs as a matrix, actual labels down, predicted across."""
    seen = [label for label in labels if any(p["actual"] == label or p["predicted"] == label for p in pairs)]
    order = (seen or sorted({p["actual"] for p in pairs} | {p["predicted"] for p in pairs}))[:MAX_CONFUSION_LABELS]
    index = {label: i for i, label in enumerate(order)}
    counts = np.zeros((len(order), len(order)), dtype=int)
    for (actual, predicted), n in Counter((p["actual"], p["predicted"]) for p in pairs).items():
        if actual in index and predicted in index:
            counts[index[actual], index[predicted]] = n
    size = 3.5 + 0.3 * len(order)
    figure = _figure(size + 1, size)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set(xticks=range(len(order)), yticks=range(len(order)), xlabel="predicted", ylabel="actual", title=title)
    axes.set_xticklabels(order, rotation=45, ha="right")
    axes.set_yticklabels(order)
    if len(order) <= 12:  # the numbers, where there is room for them
        for (row, column), n in np.ndenumerate(counts):
            axes.text(column, row, str(n), ha="center", va="center",
                      color="white" if n > counts.max() / 2 else "black", fontsize=8)  # fmt: skip
    return figure


def roc_and_pr_figures(y_true: Sequence[int], probabilities: np.ndarray, labels: Sequence[str],
                       title: str) -> tuple[Figure, Figure]:  # fmt: skip
    """ROC and precision-recall curves of each class against the rest, with their areas."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    truth = np.asarray(y_true)
    roc, pr = _figure(), _figure()
    roc_axes, pr_axes = roc.add_subplot(), pr.add_subplot()
    if len(labels) > MAX_CURVES:  # dozens of intents: one curve over every (example, class) pair
        positive, scores = (truth[:, None] == np.arange(len(labels))).ravel(), probabilities.ravel()
        fpr, tpr, _ = roc_curve(positive, scores)
        roc_axes.plot(fpr, tpr, label=f"{len(labels)} classes, micro-average (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, scores)
        pr_axes.plot(recall, precision, label=f"{len(labels)} classes, micro-average "
                     f"(AP {average_precision_score(positive, scores):.3f})")  # fmt: skip
        labels = []
    for k, label in enumerate(labels):
        positive = truth == k
        if positive.all() or not positive.any():
            continue  # a class absent from (or alone in) the test split has no curve
        fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
        roc_axes.plot(fpr, tpr, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, k])
        pr_axes.plot(
            recall, precision, label=f"{label} (AP {average_precision_score(positive, probabilities[:, k]):.3f})"
        )
    roc_axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_axes.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC")
    pr_axes.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall", ylim=(0, 1.02))
    for axes in (roc_axes, pr_axes):
        axes.legend(loc="lower right" if axes is roc_axes else "lower left", fontsize=8)
    return roc, pr


def curve_figure(history: Sequence[dict[str, Any]], title: str) -> Figure:
    """Validation loss by step."""
    figure = _figure(6, 3.8)
    axes = figure.add_subplot()
    steps = [point["step"] for point in history]
    axes.plot(steps, [point["val_loss"] for point in history], marker="o", label="validation loss")
    axes.set(xlabel="step", ylabel="validation loss", title=title)
    axes.grid(alpha=0.3)
    return figure


def log_figures(figures: dict[str, Figure]) -> None:
    """Each figure as a PNG under plots/ of the active MLflow run."""
    import mlflow

    for name, figure in figures.items():
        mlflow.log_figure(figure, f"plots/{name}.png")


def evaluation_figures(task: str, confusion: Sequence[dict[str, str]], labels: Sequence[str],
                       y_true: Sequence[int] | None, probabilities: np.ndarray | None,
                       history: Sequence[dict[str, Any]]) -> dict[str, Figure]:  # fmt: skip
    """What an evaluate run shows: the confusion matrix, a classifier's ROC and PR curves, the training curve."""
    figures: dict[str, Figure] = {}
    if confusion:
        figures["confusion_matrix"] = confusion_figure(confusion, labels, f"{task}: confusion matrix (test split)")
    if y_true is not None and probabilities is not None:
        figures["roc"], figures["precision_recall"] = roc_and_pr_figures(y_true, probabilities, labels, task)
    if history:
        figures["training_curve"] = curve_figure(history, f"{task}: validation loss while fine-tuning")
    return figures

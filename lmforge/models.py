"""Model builders: a BERT-style encoder, a GPT-style decoder, or an LSTM language model, from params.

All of them are transformers `PreTrainedModel`s, so they save and load the same way
(save_pretrained / from_pretrained, safetensors weights). The LSTM and the mean-pooled BERT
classifier are registered with the Auto classes here, in our own code, so loading them never needs
`trust_remote_code`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertModel,
    BertPreTrainedModel,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput, TokenClassifierOutput

from lmforge.errors import LmforgeError
from lmforge.schema import FinetuneTask, ModelArchitecture


class LSTMConfig(PretrainedConfig):
    model_type = "lmforge_lstm"

    def __init__(
        self, vocab_size: int = 1000, hidden_size: int = 128, num_layers: int = 2, dropout: float = 0.1, **kwargs
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        super().__init__(**kwargs)


class LSTMForCausalLM(PreTrainedModel):
    """A baseline language model: embedding -> stacked LSTM -> vocabulary logits (tied to the embedding)."""

    config_class = LSTMConfig
    base_model_prefix = "lstm"
    _tied_weights_keys = {"head.weight": "embed.weight"}  # noqa: RUF012  transformers reads it per instance

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.lstm = nn.LSTM(
            config.hidden_size,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding | nn.Linear):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> CausalLMOutput:
        hidden, _state = self.lstm(self.drop(self.embed(input_ids)))
        logits = self.head(self.drop(hidden))
        loss = None
        if labels is not None:  # predict token t+1 from tokens <= t, as GPT2LMHeadModel does
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(LSTMConfig.model_type, LSTMConfig, exist_ok=True)
AutoModelForCausalLM.register(LSTMConfig, LSTMForCausalLM, exist_ok=True)


class MeanPooledBertConfig(BertConfig):
    """BERT's config, plus `pool_max`: the classifier reads the max of the states beside their mean
    (models saved before it existed read the mean alone, which False keeps)."""

    model_type = "lmforge_bert_mean"

    def __init__(self, pool_max: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_max = pool_max

    @classmethod
    def of(cls, config: PretrainedConfig, **changes: object) -> MeanPooledBertConfig:
        """A BERT config (the encoder's) as this model's, with changes (labels, dropout)."""
        own = {key: value for key, value in config.to_dict().items() if key not in ("model_type", "architectures")}
        return cls(**{**own, **changes})


class _PooledBertHead(BertPreTrainedModel):
    """The encoder (no pooler), dropout and a linear classifier over `features` values, named as BERT's
    heads name them, so the weights load from a pretrained encoder; the subclass says what it pools."""

    def __init__(self, config: BertConfig, features: int) -> None:
        super().__init__(config)
        self.num_labels: int = config.num_labels or 2  # typed optional; a config always has it (default 2)
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, self.num_labels)
        self.post_init()


class BertForMeanPooledClassification(_PooledBertHead):
    """BERT whose classifier reads the mean of the text's final hidden states instead of [CLS], and
    with `config.pool_max` their elementwise max beside it.

    Masked-LM pretraining never trains the [CLS] position (it is never masked, and nothing reads it),
    so a [CLS] classifier starts from a vector that says little about the text and its loss sits at
    chance for hundreds of steps. The mean of the tokens' states is what MLM did train
    (sentence-transformers pools the same way). The mean dilutes the few words that settle a long
    review's sentiment; the max keeps each feature's strongest token (ULMFiT's and InferSent's concat
    pooling). docs/quality-and-budget.md gives what each pooling scores.
    """

    config_class = MeanPooledBertConfig

    def __init__(self, config: MeanPooledBertConfig) -> None:
        super().__init__(config, config.hidden_size * (2 if config.pool_max else 1))
        self.pool_max = config.pool_max

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        if self.pool_max:
            peaks = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
            pooled = torch.cat([pooled, peaks], dim=-1)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MeanPooledBertConfig.model_type, MeanPooledBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPooledBertConfig, BertForMeanPooledClassification, exist_ok=True)


class WordPooledBertConfig(MeanPooledBertConfig):
    model_type = "lmforge_bert_words"


def word_means(hidden: torch.Tensor, attention_mask: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """Each position's word's mean state: a word is the pieces from a start mark (token type 1) up
    to the next one. [CLS] (before the first mark), the last real position ([SEP]) and padding belong
    to no word; their rows are zeros."""
    length = attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    member = (attention_mask > 0) & (positions < length - 1)
    word = torch.cumsum(word_starts, dim=1) * member  # 0: no word
    index = word.unsqueeze(-1).expand_as(hidden)
    weight = member.unsqueeze(-1).to(hidden.dtype)
    sums = torch.zeros_like(hidden).scatter_add(1, index, hidden * weight)  # row w: word w's sum (w < length)
    counts = torch.zeros_like(hidden[..., :1]).scatter_add(1, word.unsqueeze(-1), weight)
    return (sums / counts.clamp(min=1)).gather(1, index) * weight


class BertForWordTagging(_PooledBertHead):
    """BERT whose tagger reads a word's first piece and the mean of all its pieces.

    With one token per Chinese character, a word's tag read at its first character alone sees the
    rest of the word only through two layers of attention; the mean hands the tagger all of it
    (People's Daily's majority-tag-per-word baseline shows how much the whole word says). The words
    come from the word-start marks finetune puts in token_type_ids (add_word_starts).
    """

    config_class = WordPooledBertConfig

    def __init__(self, config: WordPooledBertConfig) -> None:
        super().__init__(config, 2 * config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> TokenClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        # no marks (a base with one token type): every piece is a word
        starts = token_type_ids if token_type_ids is not None else torch.ones_like(input_ids)
        features = torch.cat([hidden, word_means(hidden, attention_mask, starts)], dim=-1)
        logits = self.classifier(self.dropout(features))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return TokenClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(WordPooledBertConfig.model_type, WordPooledBertConfig, exist_ok=True)
AutoModelForTokenClassification.register(WordPooledBertConfig, BertForWordTagging, exist_ok=True)


def build_pretrain_model(
    arch: ModelArchitecture, vocab_size: int, pad_id: int, cls_id: int, sep_id: int, seed: int
) -> PreTrainedModel:
    """A freshly initialised model for the architecture and objective in params (weights seeded)."""
    torch.manual_seed(seed)
    if arch.architecture == "bert":
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads,
            intermediate_size=arch.ffn_size,
            hidden_dropout_prob=arch.dropout,
            attention_probs_dropout_prob=arch.dropout,
            max_position_embeddings=arch.max_length,
            type_vocab_size=2,
            pad_token_id=pad_id,
        )
        return BertForPreTraining(config) if arch.objective == "mlm_nsp" else BertForMaskedLM(config)
    if arch.architecture == "gpt":
        gpt_config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=arch.max_length,
            n_embd=arch.hidden_size,
            n_layer=arch.layers,
            n_head=arch.heads,
            n_inner=arch.ffn_size,
            resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout,
            bos_token_id=cls_id,
            eos_token_id=sep_id,
            pad_token_id=pad_id,
        )
        return GPT2LMHeadModel(gpt_config)
    lstm_config = LSTMConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_layers=arch.layers,
        dropout=arch.dropout,
        pad_token_id=pad_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        tie_word_embeddings=True,
    )
    return LSTMForCausalLM(lstm_config)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def base_folder(folder: Path, key: str) -> str:
    """The folder a fine-tuning task starts from (models/pretrained/<base>), checked to hold a model."""
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{key}: {folder} holds no model (run the pretrain stage)")
    return str(folder)


PRETRAIN_PARAMS = "lmforge_params.json"  # the pretrain stage's resolved config, beside the model it wrote


def pretrained_objective(folder: Path) -> str | None:
    """The objective lmforge pretrained the folder's model with; None for a model it did not pretrain."""
    import json

    params = folder / PRETRAIN_PARAMS
    return str(json.loads(params.read_text())["objective"]) if params.is_file() else None


def load_pretrained(folder: Path) -> PreTrainedModel:
    """A model written by the pretrain stage, with the head of its objective (safetensors only)."""
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

    objective = pretrained_objective(folder)
    if objective is None:
        raise FileNotFoundError(f"{folder / PRETRAIN_PARAMS}: not a model the pretrain stage wrote")
    auto = {"mlm": AutoModelForMaskedLM, "mlm_nsp": AutoModelForPreTraining, "causal": AutoModelForCausalLM}
    return auto[objective].from_pretrained(str(folder), use_safetensors=True)


# --- task models: a base with the head of a fine-tuning task ---------------------------------------

MEAN_BERT = MeanPooledBertConfig.model_type
WORDS_BERT = WordPooledBertConfig.model_type
ENCODER_ONLY = {"bert", MEAN_BERT, WORDS_BERT, "roberta", "albert", "distilbert", "electra", "ernie"}
MEAN_POOLED = {"bert", MEAN_BERT, WORDS_BERT}  # model types a mean-pooled classifier or tagger can start from
LORA_TARGETS = {"bert": ["query", "value"], MEAN_BERT: ["query", "value"], WORDS_BERT: ["query", "value"],
                "gpt2": ["c_attn"], "roberta": ["query", "value"]}  # fmt: skip


DROPOUT_KEYS = {  # where each architecture keeps its dropout probabilities
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    MEAN_BERT: ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    WORDS_BERT: ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "lmforge_lstm": ("dropout",),
}


def task_pooling(task: FinetuneTask, name: str, base: str, model_type: str) -> str:
    """`cls`, `mean` or `mean_max` for a classification or token classification task
    (FinetuneTask.pooling says what each reads and when auto picks which)."""
    key = f"finetune.tasks.{name}.pooling"
    if task.pooling in ("mean", "mean_max") and model_type not in MEAN_POOLED:
        raise LmforgeError(f"{key}: {task.pooling} needs a bert base; {base} is a {model_type} model")
    if task.pooling == "mean_max" and task.kind == "token_classification":
        raise LmforgeError(f"{key}: mean_max pools a whole text (classification); a tagger reads cls or mean")
    if task.pooling != "auto":
        return task.pooling
    ours = model_type in (MEAN_BERT, WORDS_BERT)  # fine-tuned by lmforge: its encoder is lmforge's
    objective = pretrained_objective(Path(base)) if model_type == "bert" else None
    if task.kind == "token_classification":  # any encoder lmforge pretrained: one token per CJK character
        return "mean" if ours or objective is not None else "cls"
    # mlm_nsp trains [CLS] through next-sentence prediction; plain mlm leaves it untrained. Any base
    # lmforge did not pretrain (a hub BERT, say) has its [CLS] trained by its own pretraining.
    return "mean_max" if ours or objective == "mlm" else "cls"


def resolved_pooling(model: PreTrainedModel) -> str:
    """What the built model's head reads, as task_pooling names it (`cls` for any other head)."""
    if model.config.model_type == WORDS_BERT:
        return "mean"
    if model.config.model_type == MEAN_BERT:
        return "mean_max" if model.config.pool_max else "mean"
    return "cls"


def build_task_model(task: FinetuneTask, name: str, base: str, labels: list[str],
                     tokenizer: PreTrainedTokenizerBase, seed: int,
                     dropout: float | None = None) -> PreTrainedModel:  # fmt: skip
    """The base model with the task's head (new heads seeded), LoRA-wrapped when asked."""
    key = f"finetune.tasks.{name}.base"
    try:
        config = AutoConfig.from_pretrained(base)
    except OSError as error:
        raise LmforgeError(f"{key}: cannot load model {base!r} (offline, or not a model?): "
                           f"{' '.join(str(error).split())[:160]}") from None  # fmt: skip
    if task.kind == "generation" and config.model_type in ENCODER_ONLY:
        raise LmforgeError(f"{key}: generation needs a decoder (gpt, lstm); {base} is a {config.model_type} encoder")
    if task.kind != "generation" and config.model_type == "lmforge_lstm":
        raise LmforgeError(f"{key}: the LSTM baseline is a language model only; use a bert or gpt base for {task.kind}")
    torch.manual_seed(seed)
    options: dict[str, Any] = {"use_safetensors": True}
    if dropout is not None:
        options.update({key: dropout for key in DROPOUT_KEYS.get(config.model_type, ())})
    model: PreTrainedModel
    if task.kind == "generation":
        model = AutoModelForCausalLM.from_pretrained(base, **options)
    elif (pooling := task_pooling(task, name, base, config.model_type)) in ("mean", "mean_max"):
        head, head_config = ((BertForWordTagging, WordPooledBertConfig) if task.kind == "token_classification"
                             else (BertForMeanPooledClassification, MeanPooledBertConfig))  # fmt: skip
        dropouts = {key: value for key, value in options.items() if key != "use_safetensors"}
        pooled_config = head_config.of(
            config, id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
            pool_max=pooling == "mean_max", **dropouts,
        )  # fmt: skip
        model = head.from_pretrained(base, config=pooled_config, use_safetensors=True)
    else:
        auto = AutoModelForSequenceClassification if task.kind == "classification" else AutoModelForTokenClassification
        model = auto.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **options,
        )  # fmt: skip
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if task.method == "lora":
        model = wrap_lora(model, task, name)
    return model


def wrap_lora(model: PreTrainedModel, task: FinetuneTask, name: str) -> PreTrainedModel:
    from peft import LoraConfig, TaskType, get_peft_model

    targets = task.lora.target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise LmforgeError(f"finetune.tasks.{name}.lora.target_modules: set it for a {model.config.model_type} model")
    task_type = {"classification": TaskType.SEQ_CLS, "token_classification": TaskType.TOKEN_CLS,
                 "generation": TaskType.CAUSAL_LM}[task.kind]  # fmt: skip
    config = LoraConfig(task_type=task_type, r=task.lora.r, lora_alpha=task.lora.alpha,
                        lora_dropout=task.lora.dropout, target_modules=targets)  # fmt: skip
    # A PeftModel wraps the model and forwards to it; training and saving treat it as the model.
    return cast(PreTrainedModel, get_peft_model(model, config))


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

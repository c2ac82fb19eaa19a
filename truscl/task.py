"""The task spec: everything a device must agree to before it contributes.

The owner publishes the spec (retained, over MQTT) and anchors its keccak hash on chain with
``createTask``; a device accepts a spec only if its hash matches the chain, so a broker or
aggregator cannot quietly change the model, the privacy terms or the HE profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import numpy as np

from truscl.config import TomlReader
from truscl.errors import ConfigError
from truscl.hashing import keccak
from truscl.learning import (
    MODELS,
    FeatureScaler,
    Model,
    OptimiserTerms,
    feature_matrix,
    labels,
    make_model,
)
from truscl.learning.features import (
    DEFAULT_FEATURES,
    DEFAULT_LABEL,
    FEATURES,
    Sample,
    check_names,
)
from truscl.wire.chunking import DEFAULT_MAX_MESSAGE, MIN_MESSAGE

MAX_MESSAGE_LIMIT = 1024 * 1024  # the largest MQTT payload a task may ask for
SPEC_MAX_BYTES = 64 * 1024  # the largest spec message a role reads
MODEL_ENVELOPE_BYTES = 1024  # a model message's bytes beyond its float64 parameters, at most


def max_params(max_message: int) -> int:
    """The most parameters a task of ``max_message`` may have: its model is released as one
    message, its float64 parameters and their envelope."""
    return (max_message - MODEL_ENVELOPE_BYTES) // 8


@dataclass(frozen=True)
class DpTerms:
    """Record-level DP-SGD on each device, accounted with RDP."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    batch_size: int = 32  # expected Poisson batch; q = batch_size / readings trained on
    local_steps: int = 20
    learning_rate: float = 2.0
    delta: float = 1e-5
    epsilon_budget: float = 8.0
    update_clip: float = 5.0  # L2 bound on the model delta a device sends

    def __post_init__(self) -> None:
        checks = {
            "clip_norm": self.clip_norm > 0,
            "noise_multiplier": self.noise_multiplier >= 0,
            "batch_size": self.batch_size >= 1,
            "local_steps": self.local_steps >= 1,
            "learning_rate": self.learning_rate > 0,
            "delta": 0 < self.delta < 1,
            "epsilon_budget": self.epsilon_budget > 0,
            "update_clip": self.update_clip > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid DP terms: {', '.join(bad)}")


@dataclass(frozen=True)
class TaskSpec:
    task: str  # 0x-prefixed bytes32
    rounds: int
    quorum: int
    he_profile: str
    context_hash: str
    feature_offsets: tuple[float, ...]
    feature_scales: tuple[float, ...]
    features: tuple[str, ...] = DEFAULT_FEATURES  # names in truscl.learning.features.FEATURES
    model: str = "logistic"  # a kind of truscl.learning.registry.MODELS
    window: int = 864  # the most readings a device trains on (its most recent ones)
    round_seconds: float = 30.0
    max_message: int = DEFAULT_MAX_MESSAGE
    dp: DpTerms = field(default_factory=DpTerms)
    optimiser: OptimiserTerms = field(default_factory=OptimiserTerms)  # the owner's, per round
    late_updates: bool = True  # an update that misses its round's close counts in the next
    # The fewest accepted updates a round's aggregate may hold for any key holder to decrypt it
    # (also a term on chain): an "aggregate" of one update would be that device's update.
    min_cohort: int = 2
    # Threshold mode: the key holders (broker identity name, Ethereum address) that share the
    # CKKS secret key, all needed to decrypt, and the digest of the signed key-generation
    # transcript that produced ``context_hash``. Both empty in single-key mode.
    key_holders: tuple[tuple[str, str], ...] = ()
    keygen_digest: str = ""
    label: str = DEFAULT_LABEL  # what the model predicts (truscl.learning.features.LABELS)
    hidden: tuple[int, ...] = ()  # an mlp's hidden layer sizes; none for logistic
    # The fewest readings a device trains on: it waits for them, then trains on up to
    # ``window``. 0 stands for ``window`` (train on full windows only). The task's privacy
    # figures take this worst case: the fewer readings, the higher the sampling rate.
    min_readings: int = 0

    def __post_init__(self) -> None:
        if self.min_readings == 0:
            object.__setattr__(self, "min_readings", self.window)  # frozen: set once, here
        if self.rounds < 1 or self.quorum < 1:
            raise ConfigError("rounds and quorum must be at least 1")
        if self.min_cohort < 2:
            raise ConfigError("min_cohort must be at least 2")
        if bool(self.key_holders) != bool(self.keygen_digest) or len(self.key_holders) == 1:
            raise ConfigError("a threshold key needs two or more holders and its transcript")
        if not (len(self.features) == len(self.feature_offsets) == len(self.feature_scales)):
            raise ConfigError("one offset and one scale per feature")
        self.scaler  # noqa: B018 - validates offsets and scales
        if not MIN_MESSAGE <= self.max_message <= MAX_MESSAGE_LIMIT:
            raise ConfigError(
                f"max_message must be within {MIN_MESSAGE} and {MAX_MESSAGE_LIMIT} bytes"
            )
        if not self.dp.batch_size <= self.min_readings <= self.window:
            raise ConfigError(
                f"min_readings ({self.min_readings}) must be within the expected batch "
                f"({self.dp.batch_size}) and the window ({self.window})"
            )
        check_names(self.features, self.label)
        n_params = self.make_model().n_params
        if n_params > max_params(self.max_message):
            raise ConfigError(
                f"the {self.model} model has {n_params} parameters; a task with max_message "
                f"{self.max_message} allows at most {max_params(self.max_message)} (its model "
                f"is one message), and max_message may be up to {MAX_MESSAGE_LIMIT} bytes"
            )

    @property
    def task_id(self) -> bytes:
        return bytes.fromhex(self.task[2:])

    @property
    def scaler(self) -> FeatureScaler:
        return FeatureScaler(self.feature_offsets, self.feature_scales)

    def make_model(self) -> Model:
        """The task's model (:func:`truscl.learning.make_model`)."""
        return make_model(self.model, len(self.features), self.hidden)

    @property
    def n_params(self) -> int:
        """Parameters of the task's model: the length of every update and released model."""
        return self.make_model().n_params

    def inputs(self, readings: Sequence[Sample]) -> np.ndarray:
        """The model's scaled inputs for ``readings`` (rows), the task's features in order."""
        return self.scaler.apply(feature_matrix(self.features, readings))

    def targets(self, readings: Sequence[Sample]) -> np.ndarray:
        """The 0/1 labels of ``readings``."""
        return labels(self.label, readings)

    @property
    def he_mode(self) -> str:
        """``threshold`` when the key is shared among holders, else ``single-key``."""
        return "threshold" if self.key_holders else "single-key"

    @property
    def sampling_rate(self) -> float:
        """The highest sampling rate a device trains at (on ``min_readings`` readings): what
        the task's privacy terms are checked with, since no round may cost more."""
        return self.sampling_rate_for(self.min_readings)

    def sampling_rate_for(self, readings: int) -> float:
        """The Poisson sampling rate of a round trained on ``readings`` readings."""
        if not self.min_readings <= readings <= self.window:
            raise ValueError(
                f"a round trains on {self.min_readings} to {self.window} readings, not {readings}"
            )
        return self.dp.batch_size / readings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        try:
            fields = dict(data)
            fields["dp"] = DpTerms(**fields["dp"])
            fields["optimiser"] = OptimiserTerms(**fields["optimiser"])
            for name in ("feature_offsets", "feature_scales", "features", "hidden"):
                if name in fields:
                    fields[name] = tuple(fields[name])
            fields["key_holders"] = tuple(
                (str(name), str(address)) for name, address in fields.get("key_holders", ())
            )
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed task spec: {exc}") from None

    def encode(self) -> bytes:
        return cbor2.dumps(self.to_dict(), canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> TaskSpec:
        try:
            fields = cbor2.loads(data)
        except Exception as exc:  # cbor2 raises several types for garbage
            raise ConfigError(f"undecodable task spec: {exc}") from None
        if not isinstance(fields, dict):
            raise ConfigError("task spec is not a map")
        return cls.from_dict(fields)

    def hash(self) -> bytes:
        return keccak(self.encode())


def _terms(reader: TomlReader, table: str, defaults: Any) -> dict[str, Any]:
    """A table of terms (``[dp]``, ``[optimiser]``) as keyword arguments for its dataclass:
    each key of ``defaults`` typed as its default value, and absent keys left at it."""
    values = reader.table(table)
    fields = {}
    for name, value in asdict(defaults).items():
        kind: type | tuple[type, ...] = (
            type(value) if isinstance(value, str | int) else (int, float)
        )
        fields[name] = reader.take(values, f"{table}.{name}", kind, value)
    return fields


def load_task_file(path: Path, *, task: str, context_hash: str) -> TaskSpec:
    """The owner's task file (TOML) as a spec for ``task`` under the HE context ``context_hash``.

    The file states what an operator decides (rounds, quorum, deadline, features and their
    physical ranges, label, model, DP terms, server optimiser); the task id and the context
    hash come from ``owner init``.
    """
    from truscl.privacy.ckks import DEFAULT_PROFILE, PROFILES  # TenSEAL: only when needed

    reader = TomlReader.load(path)
    data = reader.data
    features = tuple(reader.take(data, "features", list, list(DEFAULT_FEATURES)))
    label = reader.take(data, "label", str, DEFAULT_LABEL)
    if not all(isinstance(name, str) for name in features):
        raise reader.fail("features must be a list of feature names")
    try:
        check_names(features, label)
    except ConfigError as exc:
        raise reader.fail(f"{exc}") from None
    hidden = reader.take(data, "hidden", list, [])
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in hidden):
        raise reader.fail(f"hidden must be a list of layer sizes, got {hidden!r}")
    ranges = _ranges(reader, features)
    dp_fields = _terms(reader, "dp", DpTerms())
    optimiser_fields = _terms(reader, "optimiser", OptimiserTerms())
    fields: dict[str, Any] = {
        "task": task,
        "rounds": reader.take(data, "rounds", int),
        "quorum": reader.take(data, "quorum", int),
        "round_seconds": reader.number(data, "round_seconds", 60.0),
        "window": reader.take(data, "window", int, 864),
        "max_message": reader.take(data, "max_message", int, DEFAULT_MAX_MESSAGE),
        "he_profile": reader.take(data, "he_profile", str, DEFAULT_PROFILE.name),
        "model": reader.take(data, "model", str, "logistic"),
        "late_updates": reader.take(data, "late_updates", bool, True),
        "min_cohort": reader.take(data, "min_cohort", int, 2),
        "features": features,
        "label": label,
        "hidden": tuple(hidden),
        "context_hash": context_hash,
    }
    fields["min_readings"] = reader.take(data, "min_readings", int, fields["window"])
    reader.no_leftovers()
    if fields["he_profile"] not in PROFILES:
        raise reader.fail(f"he_profile must be one of {sorted(PROFILES)}")
    if fields["model"] not in MODELS:
        raise reader.fail(f"model must be one of {', '.join(map(repr, MODELS))}")
    if fields["min_readings"] < 1:
        raise reader.fail("min_readings must be at least 1")
    if fields["round_seconds"] <= 0:
        raise reader.fail("round_seconds must be > 0")
    if fields["min_cohort"] < 2:
        raise reader.fail("min_cohort must be at least 2 (one update alone is no aggregate)")
    try:
        scaler = FeatureScaler.from_ranges(ranges)
        return TaskSpec(
            **fields,
            feature_offsets=scaler.offset,
            feature_scales=scaler.scale,
            dp=DpTerms(**dp_fields),
            optimiser=OptimiserTerms(**optimiser_fields),
        )
    except ConfigError as exc:
        raise reader.fail(str(exc)) from None


def _ranges(reader: TomlReader, features: Sequence[str]) -> list[tuple[float, float]]:
    """``[ranges]``: each feature's ``[low, high]``; a derived feature with a natural range
    (the hour's sine and cosine: [-1, 1]) takes it when the file gives none."""
    table = reader.table("ranges")
    ranges = []
    for name in features:
        pair = reader.take(table, f"ranges.{name}", list, FEATURES[name].natural_range)
        if pair is None:
            raise reader.fail(f"ranges.{name} is required")
        if len(pair) != 2 or not all(isinstance(v, int | float) for v in pair):
            raise reader.fail(f"ranges.{name} must be [low, high]")
        ranges.append((float(pair[0]), float(pair[1])))
    return ranges

"""Training and prediction through LiteRT: the task's model as a .tflite file, run on the device.

numpy stays the reference and the fallback (:func:`truscl.privacy.dp.dp_sgd`). The LiteRT
backend runs the same DP-SGD step inside a builtin-ops-only .tflite model built by
scripts/build_tflite.py: ``set_weights``, then one ``train`` call per step, then ``get_weights``.
Python keeps the privacy-relevant randomness: every step's Poisson sample and its noise are
drawn here from the caller's generator (a secure one on a device), in the same order and from
the same stream as ``dp_sgd`` draws them, so the two backends train on the same sample with the
same noise and differ only by float32 rounding.

The parameters live in the model's resource variables (``set_weights``/``get_weights``) rather
than travelling in and out of every step: twenty steps move the vector twice, not forty times,
and the model file is self-contained for a device that also predicts with it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from truscl.errors import ConfigError
from truscl.learning import LogisticModel, MlpModel
from truscl.privacy.dp import DpSgdConfig, dp_sgd
from truscl.task import TaskSpec

log = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parent / "models"
BACKENDS = ("numpy", "litert")
SIGNATURES = ("train", "infer", "get_weights", "set_weights")

Trainer = Callable[
    [np.ndarray, np.ndarray, np.ndarray, DpSgdConfig, np.random.Generator], np.ndarray
]
"""``(params, X, y, config, rng) -> trained params``: :func:`dp_sgd` with its model bound."""
Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(params, X) -> probability of class 1 per row``."""


class _SignatureRunner(Protocol):
    def __call__(self, **inputs: np.ndarray | np.float32) -> dict[str, np.ndarray]: ...


def interpreter_class() -> type[Any] | None:
    """LiteRT's interpreter, or tflite-runtime's where that is what the board has; else None."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return None
    return Interpreter


def model_file(layers: Sequence[int], models: Path = MODELS) -> Path:
    """Where the .tflite file of a model with these layer widths is (it may not exist); the
    name is scripts/build_tflite.py's."""
    return models / ("mlp-" + "-".join(str(n) for n in layers) + ".tflite")


def layers_of(spec: TaskSpec) -> tuple[int, ...] | None:
    """The layer widths of the task's model, input first (logistic regression is the MLP with
    no hidden layer); None for a model of another kind."""
    model = spec.make_model()
    if isinstance(model, MlpModel):
        return (model.n_features, *model.hidden, 1)
    if isinstance(model, LogisticModel):
        return (model.n_features, 1)
    return None


def numpy_trainer(spec: TaskSpec) -> Trainer:
    """:func:`dp_sgd` with the task's numpy model bound: the reference backend."""
    return functools.partial(dp_sgd, spec.make_model())


def _batch_rows(count: int) -> int:
    """Rows a step's batch is padded to: the next power of two, so a LiteRT input keeps one of
    a few shapes (each new shape re-plans the interpreter's memory) and is never empty."""
    return 1 << max(count - 1, 0).bit_length()


class LiteRtModel:
    """One .tflite model's interpreter, with the call shapes of the numpy path.

    Not thread-safe (nor is a LiteRT interpreter): one agent's worker thread uses it.
    """

    def __init__(self, path: Path) -> None:
        interpreter = interpreter_class()
        if interpreter is None:
            raise ConfigError("no LiteRT runtime: install ai-edge-litert (or tflite-runtime)")
        self.path = path
        self._interpreter = interpreter(model_path=str(path))
        missing = set(SIGNATURES) - set(self._interpreter.get_signature_list())
        if missing:
            raise ConfigError(f"{path.name} lacks the signatures {sorted(missing)}")
        self._run: dict[str, _SignatureRunner] = {
            name: self._interpreter.get_signature_runner(name) for name in SIGNATURES
        }
        self.n_params = int(self._run["get_weights"]()["weights"].shape[0])

    def set_weights(self, params: np.ndarray) -> None:
        if params.shape != (self.n_params,):
            raise ValueError(f"params must have shape ({self.n_params},), got {params.shape}")
        self._run["set_weights"](weights=params.astype(np.float32))

    def get_weights(self) -> np.ndarray:
        return self._run["get_weights"]()["weights"].astype(np.float64)

    def predict_proba(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Probability of class 1 per row of ``X`` (``infer`` after ``set_weights``)."""
        self.set_weights(params)
        x = np.asarray(X, dtype=np.float32)
        return self._run["infer"](x=x)["probability"].astype(np.float64)

    def dp_sgd(
        self,
        params: np.ndarray,
        X: np.ndarray,
        y: np.ndarray,
        config: DpSgdConfig,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """:func:`truscl.privacy.dp.dp_sgd`, each step run by the model's ``train`` signature.

        The draws are dp_sgd's, in its order: ``rng.random(n)`` for the sample, then the
        noise; ``rng.normal(0, s, P)`` is ``s * rng.standard_normal(P)`` from the same stream,
        and the model multiplies by ``s = noise_multiplier * clip_norm`` itself.
        """
        n = X.shape[0]
        if n == 0:
            raise ValueError("DP-SGD needs at least one example")
        scalars = {
            "clip_norm": np.float32(config.clip_norm),
            "noise_multiplier": np.float32(config.noise_multiplier),
            "expected_batch": np.float32(config.sampling_rate * n),
            "learning_rate": np.float32(config.learning_rate),
        }
        X32, y32 = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.float32)
        self.set_weights(np.asarray(params, dtype=np.float64))
        for _ in range(config.steps):
            sampled = np.flatnonzero(rng.random(n) < config.sampling_rate)
            noise = rng.standard_normal(self.n_params).astype(np.float32)
            pad = _batch_rows(len(sampled)) - len(sampled)  # rows of zeros, masked out
            self._run["train"](
                x=np.pad(X32[sampled], ((0, pad), (0, 0))),
                y=np.pad(y32[sampled], (0, pad)),
                mask=np.pad(np.ones(len(sampled), np.float32), (0, pad)),
                noise=noise,
                **scalars,
            )
        return self.get_weights()


class ModelRuntime:
    """Which backend trains and predicts for a task's model, per the agent's configuration.

    ``litert`` uses the .tflite file of the task's model shape; when there is none, or no
    LiteRT runtime is installed, it says so once (per model) and uses numpy, the reference.
    """

    def __init__(self, backend: str = "numpy", models: Path = MODELS) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"training backend must be one of {', '.join(BACKENDS)}")
        self.backend = backend
        self._models = models
        self._loaded: dict[tuple[str, tuple[int, ...] | None], LiteRtModel | None] = {}

    def litert(self, spec: TaskSpec) -> LiteRtModel | None:
        """The task model's LiteRT interpreter, or None where numpy must do."""
        if self.backend != "litert":
            return None
        key = (spec.model, layers_of(spec))
        if key not in self._loaded:
            self._loaded[key] = self._load(*key)
        return self._loaded[key]

    def _load(self, model: str, layers: tuple[int, ...] | None) -> LiteRtModel | None:
        if layers is None:
            log.warning("LiteRT: no .tflite shape for the %r model; training with numpy", model)
            return None
        path = model_file(layers, self._models)
        if not path.is_file():
            log.warning("LiteRT: no model file %s for the task's model; using numpy", path)
            return None
        try:
            return LiteRtModel(path)
        except (ConfigError, ValueError, RuntimeError) as exc:  # no runtime, or a broken file
            log.warning("LiteRT: cannot use %s (%s); using numpy", path.name, exc)
            return None

    def trainer(self, spec: TaskSpec) -> Trainer:
        model = self.litert(spec)
        return numpy_trainer(spec) if model is None else model.dp_sgd

    def predictor(self, spec: TaskSpec) -> Predictor:
        model = self.litert(spec)
        return spec.make_model().predict_proba if model is None else model.predict_proba

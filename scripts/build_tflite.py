"""Build the LiteRT (.tflite) models the device agent trains and predicts with.

Built with TensorFlow 2.21.0 (tensorflow-cpu, Python 3.11, x86_64) in a venv outside the
project: TensorFlow is a build-time tool, never a dependency of the agent. The committed files
came from:

    python3 -m venv /work/tf-venv && /work/tf-venv/bin/pip install tensorflow-cpu==2.21.0
    /work/tf-venv/bin/python scripts/build_tflite.py 4 1
    /work/tf-venv/bin/python scripts/build_tflite.py 4 8 1
    /work/tf-venv/bin/python scripts/build_tflite.py 3 8 1
    /work/tf-venv/bin/python scripts/build_tflite.py 4 8 4 1
    /work/tf-venv/bin/python scripts/build_tflite.py 6 8 4 1   # deploy/tasks/mlp.toml
    /work/tf-venv/bin/python scripts/build_tflite.py 3 1       # deploy/tasks/three-features.toml

The arguments are the layer widths, input first, output (1, the logit) last: ``4 1`` is the
logistic model, ``4 8 1`` an MLP with one hidden layer of 8 tanh units, ``4 8 4 1`` one
with two (deploy/task.toml's example). The file is written to
agent/models/mlp-4-8-1.tflite (one name per shape; ``--out`` to put it elsewhere).

The model holds its parameters as resource variables and has four signatures:

- ``set_weights(weights)`` and ``get_weights()``: the flat float32 parameter vector, in the
  numpy models' layout (for each layer, ``W`` of shape (n_in, n_out) in C order, then ``b``).
- ``infer(x)``: ``probability`` = sigmoid of the logit, per row of ``x``.
- ``train(x, y, mask, noise, clip_norm, noise_multiplier, expected_batch, learning_rate)``: one
  DP-SGD step exactly as :func:`truscl.privacy.dp.dp_sgd` takes it: per-example gradients of
  the binary cross-entropy (backpropagated by hand, so that only builtin ops appear), each row
  clipped to ``clip_norm``, the rows whose ``mask`` is 0 dropped (the caller's Poisson sample),
  the sum plus ``noise_multiplier * clip_norm * noise``, divided by ``expected_batch`` and
  stepped with ``learning_rate``. It returns the new ``weights``. The caller draws the sample
  and the standard-normal ``noise`` in numpy from a secure generator; TensorFlow's RNG is
  never used.

Only builtin ops: the converter is not given SELECT_TF_OPS, so a Flex op fails the build
(``tf.nn.relu``'s gradient would; tanh and explicit formulas do not).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import tensorflow as tf

MODELS = Path(__file__).resolve().parent.parent / "agent" / "models"


def model_name(layers: list[int]) -> str:
    return "mlp-" + "-".join(str(n) for n in layers) + ".tflite"


class DpMlp(tf.Module):
    def __init__(self, layers: list[int]) -> None:
        super().__init__()
        self.shapes = list(itertools.pairwise(layers))
        self.n_params = sum(n_in * n_out + n_out for n_in, n_out in self.shapes)
        self.w = [
            tf.Variable(tf.zeros((i, o)), name=f"w{k}") for k, (i, o) in enumerate(self.shapes)
        ]
        self.b = [tf.Variable(tf.zeros((o,)), name=f"b{k}") for k, (_, o) in enumerate(self.shapes)]
        n_features = layers[0]
        scalar = tf.TensorSpec([], tf.float32)
        self.infer = tf.function(
            self._infer, input_signature=[tf.TensorSpec([None, n_features], tf.float32)]
        )
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights, input_signature=[tf.TensorSpec([self.n_params], tf.float32)]
        )
        self.train = tf.function(
            self._train,
            input_signature=[
                tf.TensorSpec([None, n_features], tf.float32),  # x
                tf.TensorSpec([None], tf.float32),  # y
                tf.TensorSpec([None], tf.float32),  # mask
                tf.TensorSpec([self.n_params], tf.float32),  # noise, standard normal
                scalar,  # clip_norm
                scalar,  # noise_multiplier
                scalar,  # expected_batch
                scalar,  # learning_rate
            ],
        )

    def _forward(self, x: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        """The inputs of every layer and the logit (shape (batch,))."""
        inputs, h = [], x
        for k, (w, b) in enumerate(zip(self.w, self.b, strict=True)):
            inputs.append(h)
            z = tf.matmul(h, w) + b
            h = tf.tanh(z) if k < len(self.w) - 1 else z
        return inputs, h[:, 0]

    def _flat(self) -> tf.Tensor:
        parts = []
        for w, b in zip(self.w, self.b, strict=True):
            parts += [tf.reshape(w, [-1]), b]
        return tf.concat(parts, axis=0)

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        _, logit = self._forward(x)
        return {"probability": tf.sigmoid(logit)}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"weights": self._flat()}

    def _set_weights(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        start = 0
        for w, b, (n_in, n_out) in zip(self.w, self.b, self.shapes, strict=True):
            w.assign(tf.reshape(weights[start : start + n_in * n_out], (n_in, n_out)))
            start += n_in * n_out
            b.assign(weights[start : start + n_out])
            start += n_out
        return {"weights": self._flat()}

    def _per_example_grads(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Rows of d(BCE)/d(params), shape (batch, n_params), by backpropagation written out:
        the logit's error is ``p - y``; through ``z = h W + b`` it gives ``h ⊗ delta`` for W
        and ``delta`` for b, and reaches the layer below as ``(delta W^T)(1 - h^2)`` (tanh)."""
        inputs, logit = self._forward(x)
        delta = tf.expand_dims(tf.sigmoid(logit) - y, 1)
        parts: list[tf.Tensor] = []
        for k in reversed(range(len(self.w))):
            n_in, n_out = self.shapes[k]
            h = inputs[k]
            grad_w = tf.expand_dims(h, 2) * tf.expand_dims(delta, 1)
            parts = [tf.reshape(grad_w, [-1, n_in * n_out]), delta, *parts]
            if k > 0:
                delta = tf.matmul(delta, self.w[k], transpose_b=True) * (1.0 - h * h)
        return tf.concat(parts, axis=1)

    def _train(
        self,
        x: tf.Tensor,
        y: tf.Tensor,
        mask: tf.Tensor,
        noise: tf.Tensor,
        clip_norm: tf.Tensor,
        noise_multiplier: tf.Tensor,
        expected_batch: tf.Tensor,
        learning_rate: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        grads = self._per_example_grads(x, y)
        norms = tf.sqrt(tf.reduce_sum(grads * grads, axis=1, keepdims=True))
        # As clip_rows: rows within the bound divide by the bound (factor 1), never by zero.
        factor = clip_norm / tf.maximum(norms, clip_norm) * tf.expand_dims(mask, 1)
        noisy_sum = tf.reduce_sum(grads * factor, axis=0) + noise_multiplier * clip_norm * noise
        flat = self._flat() - learning_rate * noisy_sum / expected_batch
        return self._set_weights(flat)


def build(layers: list[int]) -> bytes:
    module = DpMlp(layers)
    signatures = {
        "train": module.train.get_concrete_function(),
        "infer": module.infer.get_concrete_function(),
        "get_weights": module.get_weights.get_concrete_function(),
        "set_weights": module.set_weights.get_concrete_function(),
    }
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layers", nargs="+", type=int, help="widths, input first, 1 last")
    parser.add_argument("--out", type=Path, help="output file (default agent/models/NAME)")
    args = parser.parse_args()
    layers: list[int] = args.layers
    if len(layers) < 2 or layers[-1] != 1 or min(layers) < 1:
        parser.error("give at least an input width and the output width 1, e.g. `4 8 1`")
    out = args.out or MODELS / model_name(layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(build(layers))
    print(f"{out}: {out.stat().st_size} bytes, TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()

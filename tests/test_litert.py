"""LiteRT on the device: the .tflite models train like numpy's DP-SGD and predict like numpy's
model, the agent's configuration picks the backend and falls back to numpy, and the occupancy
output follows the model's prediction.

Agreement tolerance: LiteRT computes in float32, numpy in float64. After 20 DP-SGD steps on
the same sample and noise the parameters agree to ``RTOL = 1e-5`` relative plus ``ATOL = 1e-6``
absolute (measured: about 2e-8 relative for the logistic model).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from eth_account import Account
from harness import synthetic_readings

from truscl.agent.config import AgentConfig
from truscl.agent.contribution import UpdateInputs, make_update
from truscl.agent.litert import LiteRtModel, ModelRuntime, model_file
from truscl.agent.output import OccupancyOutput
from truscl.agent.sensors import Reading
from truscl.demo import occupancy_spec
from truscl.errors import ConfigError
from truscl.learning import LogisticModel, Model, make_model
from truscl.privacy.ckks import OwnerKeys, context_hash, decrypt, load_context
from truscl.privacy.dp import DpSgdConfig, dp_sgd
from truscl.sim.hardware import SimulatedBoard
from truscl.task import DpTerms, TaskSpec, load_task_file
from truscl.wire import Domain

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(4, 1), (4, 8, 1), (3, 8, 1), (4, 8, 4, 1)]
CONFIG = DpSgdConfig(
    clip_norm=1.0, noise_multiplier=1.0, sampling_rate=32 / 864, steps=20, learning_rate=2.0
)


def data(n_features: int, n: int = 864, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, n_features))
    y = (X @ rng.normal(size=n_features) + 0.2 * rng.normal(size=n) > 0).astype(np.float64)
    return X, y


def reference(layers: tuple[int, ...]) -> Model:
    """The numpy model (truscl.learning's registry) of the .tflite file for ``layers``."""
    if len(layers) == 2:
        return make_model("logistic", layers[0])
    return make_model("mlp", layers[0], layers[1:-1])


@pytest.mark.parametrize("layers", SHAPES)
@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        DpSgdConfig(  # a tight bound clips every row; more noise; every row sampled
            clip_norm=0.05, noise_multiplier=3.0, sampling_rate=1.0, steps=5, learning_rate=0.5
        ),
        DpSgdConfig(  # about one row in a thousand: most steps sample no row at all
            clip_norm=1.0, noise_multiplier=0.5, sampling_rate=1e-3, steps=10, learning_rate=1.0
        ),
    ],
)
def test_litert_and_numpy_dp_sgd_agree_on_a_fixed_seed(
    layers: tuple[int, ...], config: DpSgdConfig
) -> None:
    # Prepare
    litert = LiteRtModel(model_file(layers))
    numpy_model = reference(layers)
    X, y = data(layers[0])
    start = np.random.default_rng(3).normal(0, 0.3, numpy_model.n_params)
    # Execute: the same seed, so the same samples and the same noise
    expected = dp_sgd(numpy_model, start, X, y, config, np.random.default_rng(11))
    trained = litert.dp_sgd(start, X, y, config, np.random.default_rng(11))
    # Assert
    assert not np.allclose(expected, start, rtol=RTOL, atol=ATOL)  # it did train
    np.testing.assert_allclose(trained, expected, rtol=RTOL, atol=ATOL)
    other = litert.dp_sgd(start, X, y, config, np.random.default_rng(12))
    assert not np.allclose(other, expected, rtol=RTOL, atol=ATOL)  # the draws matter


@pytest.mark.parametrize("layers", SHAPES)
def test_infer_predicts_what_numpy_predicts(layers: tuple[int, ...]) -> None:
    litert = LiteRtModel(model_file(layers))
    numpy_model = reference(layers)
    params = np.random.default_rng(4).normal(0, 1.0, numpy_model.n_params)
    X, _ = data(layers[0], n=50)

    expected = numpy_model.predict_proba(params, X)
    np.testing.assert_allclose(litert.predict_proba(params, X), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(litert.get_weights(), params, rtol=1e-6)  # set_weights kept them


@pytest.mark.parametrize(
    "task_file",
    [ROOT / "deploy" / "task.toml", *sorted((ROOT / "deploy" / "tasks").glob("*.toml"))],
)
def test_every_example_task_has_its_tflite_model(task_file: Path) -> None:
    task = load_task_file(task_file, task="0x" + "ab" * 32, context_hash="0x" + "cd" * 32)
    model = ModelRuntime("litert").litert(task)
    assert model is not None and model.n_params == task.n_params


def test_a_model_refuses_parameters_of_another_shape() -> None:
    litert = LiteRtModel(model_file((4, 1)))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        litert.set_weights(np.zeros(6))


# -- the agent's choice of backend ---------------------------------------------------------


def spec(hidden: tuple[int, ...] = ()) -> TaskSpec:
    return occupancy_spec("0x" + "00" * 32, model="mlp" if hidden else "logistic", hidden=hidden)


@pytest.mark.parametrize("hidden", [(), (8,), (8, 4)])
def test_the_litert_runtime_trains_the_tasks_model_with_its_tflite_file(
    hidden: tuple[int, ...],
) -> None:
    task = spec(hidden)
    X, y = data(4)
    start = task.make_model().init_params()
    trained = ModelRuntime("litert").trainer(task)(start, X, y, CONFIG, np.random.default_rng(5))
    expected = ModelRuntime("numpy").trainer(task)(start, X, y, CONFIG, np.random.default_rng(5))
    np.testing.assert_allclose(trained, expected, rtol=RTOL, atol=ATOL)
    assert not np.array_equal(trained, expected)  # float32: not the numpy computation itself


def test_without_a_model_file_litert_warns_once_and_numpy_trains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="truscl.agent.litert")
    runtime = ModelRuntime("litert", models=tmp_path)  # an empty folder: no .tflite file
    task = spec()
    X, y = data(4)
    start = np.zeros(task.n_params)
    trained = [
        runtime.trainer(task)(start, X, y, CONFIG, np.random.default_rng(5)) for _ in range(2)
    ]
    expected = dp_sgd(LogisticModel(4), start, X, y, CONFIG, np.random.default_rng(5))
    assert all(np.array_equal(t, expected) for t in trained)  # numpy's result, bit for bit
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "mlp-4-1.tflite" in warnings[0] and "numpy" in warnings[0]


def test_a_shape_without_a_tflite_file_is_trained_by_numpy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="truscl.agent.litert")
    task = spec(hidden=(5,))  # no mlp-4-5-1.tflite is built
    X, y = data(4)
    start = task.make_model().init_params()
    trained = ModelRuntime("litert").trainer(task)(start, X, y, CONFIG, np.random.default_rng(5))
    expected = dp_sgd(task.make_model(), start, X, y, CONFIG, np.random.default_rng(5))
    assert np.array_equal(trained, expected)
    assert "mlp-4-5-1.tflite" in caplog.text


def test_make_update_trains_through_litert(owner_keys: OwnerKeys) -> None:
    # Prepare: the same update made with either backend and the same generator seed
    task = occupancy_spec(
        "0x" + context_hash(owner_keys.public_context_bytes()).hex(),
        model="mlp",
        hidden=(8,),
        window=128,
        dp=DpTerms(batch_size=16),
    )
    context = load_context(owner_keys.public_context_bytes())
    inputs = UpdateInputs(
        round=1,
        params=task.make_model().init_params(),
        window=synthetic_readings(128),
        epsilon_spent=1.0,
        data_root=b"\x07" * 32,
    )
    account, domain = Account.create(), Domain(31337, "0x" + "11" * 20)

    def delta(backend: str) -> np.ndarray:
        update = make_update(
            task, inputs, context=context, account=account, domain=domain,
            rng=np.random.default_rng(21), train=ModelRuntime(backend).trainer(task),
        )  # fmt: skip
        return decrypt(owner_keys, update.ciphertext, task.n_params)

    # Execute
    litert, numpy = delta("litert"), delta("numpy")
    # Assert: the owner decrypts the same delta, to CKKS's precision
    assert np.linalg.norm(numpy) > 0.1
    np.testing.assert_allclose(litert, numpy, atol=1e-4)


def test_without_a_litert_runtime_numpy_trains(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A board with neither ai-edge-litert nor tflite-runtime installed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    caplog.set_level(logging.WARNING, logger="truscl.agent.litert")
    runtime = ModelRuntime("litert")
    task = spec()
    X, y = data(4)
    start = np.zeros(task.n_params)
    trained = runtime.trainer(task)(start, X, y, CONFIG, np.random.default_rng(5))
    runtime.predictor(task)
    expected = dp_sgd(LogisticModel(4), start, X, y, CONFIG, np.random.default_rng(5))
    assert np.array_equal(trained, expected)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "no LiteRT runtime" in warning and "numpy" in warning


def test_a_broken_model_file_is_refused_and_numpy_trains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_file((4, 1), tmp_path).write_bytes(b"TFL3" + bytes(60))  # not a flatbuffer model
    task = spec()
    X, y = data(4)
    start = np.zeros(task.n_params)
    runtime = ModelRuntime("litert", models=tmp_path)
    trained = runtime.trainer(task)(start, X, y, CONFIG, np.random.default_rng(5))
    assert runtime.litert(task) is None
    assert np.array_equal(
        trained, dp_sgd(LogisticModel(4), start, X, y, CONFIG, np.random.default_rng(5))
    )
    assert "cannot use mlp-4-1.tflite" in caplog.text


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="numpy, litert"):
        ModelRuntime("tensorflow")


# -- configuration -------------------------------------------------------------------------

AGENT_TOML = """
task = "0x{task}"
[device]
key = "device.key"
state = "state"
[broker]
host = "broker.lan"
[chain]
rpc = "http://127.0.0.1:8545"
contract = "0x{contract}"
""".format(task="ab" * 32, contract="12" * 20)


def load(tmp_path: Path, extra: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_TOML + extra)
    return AgentConfig.load(path)


def test_the_config_picks_the_backend_and_the_output(tmp_path: Path) -> None:
    default = load(tmp_path, "")
    assert default.training == "numpy" and default.output is None
    config = load(tmp_path, '[training]\nbackend = "litert"\n[output]\npin = 17\n')
    assert config.training == "litert"
    assert config.output is not None and config.output.pin == 17
    assert config.output.threshold == 0.5 and config.output.active_high


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[training]\nbackend = "tflite"\n', "training.backend must be one of"),
        ("[training]\nbackend = 1\n", "training.backend has the wrong type"),
        ('[training]\nbackend = "numpy"\nsteps = 3\n', "unknown key training.steps"),
        ("[output]\nthreshold = 0.7\n", "output.pin is required"),
        ('[output]\npin = "GPIO17"\n', "output.pin has the wrong type"),
        ("[output]\npin = 17\nthreshold = 1.5\n", "output.threshold must be within 0 and 1"),
        ("[output]\npin = 17\nactive_high = 1\n", "output.active_high has the wrong type"),
        ("[output]\npin = 4\n", "output.pin is the PIR's pin"),
    ],
)
def test_every_training_and_output_mistake_is_named(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, extra)


# -- the occupancy output ------------------------------------------------------------------


def reading(co2_ppm: float, timestamp: float) -> Reading:
    return Reading(timestamp, 21.0, 40.0, 1013.0, 300.0, co2_ppm, motion=False)


@pytest.mark.parametrize("backend", ["litert", "numpy"])
def test_the_output_pin_follows_the_prediction(backend: str) -> None:
    # Prepare: a model that calls a room occupied when its CO2 is high
    task = spec()
    board = SimulatedBoard()
    pin = board.pin(17)
    runtime = ModelRuntime(backend)
    co2_only = np.array([0.0, 0.0, 0.0, 8.0, 0.0])
    with OccupancyOutput(17, board, runtime) as output:
        # Execute / Assert: a new reading, then a new model, each drives the pin
        output.show(task, 1, co2_only, reading(co2_ppm=1800, timestamp=1.0))
        assert pin.state and output.is_on and output.probability is not None
        expected = LogisticModel(4).predict_proba(co2_only, task.inputs([reading(1800, 1.0)]))[0]
        assert output.probability == pytest.approx(expected, rel=1e-5)
        output.show(task, 1, co2_only, reading(co2_ppm=450, timestamp=2.0))
        assert not pin.state
        output.show(task, 2, -co2_only, reading(co2_ppm=450, timestamp=2.0))
        assert pin.state
        output.show(task, 2, -co2_only, reading(co2_ppm=float("nan"), timestamp=3.0))
        assert pin.state  # a reading without CO2 predicts nothing: the pin keeps its level


def test_an_active_low_relay_is_driven_low_when_occupied() -> None:
    board = SimulatedBoard()
    with OccupancyOutput(27, board, ModelRuntime("litert"), active_high=False) as output:
        assert board.pin(27).state  # off: high
        output.show(spec(), 1, np.array([0.0, 0.0, 0.0, 0.0, 6.0]), reading(450, 1.0))
        assert not board.pin(27).state


# -- the agent, end to end -----------------------------------------------------------------


@pytest.mark.slow
def test_the_agent_predicts_with_the_global_model_through_litert(
    tmp_path: Path, owner_keys: OwnerKeys
) -> None:
    from conftest import task_owner

    from truscl.agent.device import DeviceAgent
    from truscl.agent.sensors import SensorSuite
    from truscl.broker import Mosquitto
    from truscl.chain import ChainClient, EmbeddedChain
    from truscl.sim.fleet import make_fleet

    # Prepare: a task whose initial model says "occupied" whatever the air
    chain = EmbeddedChain()
    contract = ChainClient.deploy(chain.web3(), chain.new_account(), chain.lock)
    with Mosquitto(tmp_path / "broker") as broker:
        owner = task_owner(chain, contract.address, owner_keys, broker)
        task = occupancy_spec(owner.context_hash, rounds=2, quorum=1)
        owner.create_task(task, chain.new_account().address, np.array([0, 0, 0, 0, 5.0]))
        (device,) = make_fleet(1, seed=3)
        suite = SensorSuite(device.pin_factory, device.i2c_bus)
        runtime = ModelRuntime("litert")
        output = OccupancyOutput(17, device.pin_factory, runtime)
        agent = DeviceAgent(
            account=chain.new_account(),
            task=task.task,
            chain=chain.client(contract.address),
            broker=broker.settings,
            workdir=tmp_path / "device",
            collect=lambda: [suite.read(device.now)],
            runtime=runtime,
            output=output,
        )
        # Execute
        agent.start()
        deadline = time.monotonic() + 120  # a bound for a failure only: the wait ends when
        while output.probability is None and time.monotonic() < deadline:  # it predicted
            time.sleep(0.05)
        lit = bool(device.pin_factory.pin(17).state)
        agent.stop()
        output.close()
        suite.close()
        owner.stop()
    # Assert
    assert runtime.litert(task) is not None  # LiteRT predicted, not the numpy fallback
    assert output.probability == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)
    assert lit

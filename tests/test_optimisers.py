"""Server optimisers (Reddi et al. 2021) against steps worked by hand, and their terms and state."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from truscl.errors import ConfigError, ProtocolError
from truscl.learning import OptimiserState, OptimiserTerms, server_step
from truscl.server.owner import RELEASE_DECIMALS, ModelStore, next_model
from truscl.task import TaskSpec, load_task_file

X0 = np.array([1.0, -2.0])
D1 = np.array([0.5, -0.25])
D2 = np.array([0.25, 0.5])


def test_fedavg_with_server_rate_one_adds_the_mean_delta_exactly() -> None:
    # Prepare: deltas whose sum is not exact in binary, as a decryption's are
    rng = np.random.default_rng(1)
    params, delta = rng.normal(size=6), rng.normal(size=6) / 3

    # Execute
    after, state = server_step(OptimiserTerms(), params, delta, OptimiserState())

    # Assert: bit for bit what the owner released before optimisers existed
    assert np.array_equal(after, params + delta)
    assert state.steps == 1 and state.moments == ()


def test_fedavg_scales_the_delta_by_the_server_rate() -> None:
    after, _ = server_step(OptimiserTerms(learning_rate=0.5), X0, D1, OptimiserState())

    assert after.tolist() == [1.25, -2.125]


def test_fedavgm_accumulates_a_momentum_of_the_deltas() -> None:
    # Prepare
    terms = OptimiserTerms("fedavgm", learning_rate=0.5, momentum=0.5)

    # Execute: two rounds
    x1, s1 = server_step(terms, X0, D1, OptimiserState())
    x2, s2 = server_step(terms, x1, D2, s1)

    # Assert: v1 = D1 = [0.5, -0.25]; x1 = X0 + 0.5 v1 = [1.25, -2.125]
    #         v2 = 0.5 v1 + D2 = [0.5, 0.375]; x2 = x1 + 0.5 v2 = [1.5, -1.9375]
    assert s1.moments[0].tolist() == [0.5, -0.25] and x1.tolist() == [1.25, -2.125]
    assert s2.moments[0].tolist() == [0.5, 0.375] and x2.tolist() == [1.5, -1.9375]
    assert s2.steps == 2


def test_fedadam_steps_by_its_moments() -> None:
    # Prepare
    terms = OptimiserTerms("fedadam", learning_rate=0.1, beta1=0.5, beta2=0.75, tau=0.5)

    # Execute: two rounds
    x1, s1 = server_step(terms, X0, D1, OptimiserState())
    x2, s2 = server_step(terms, x1, D2, s1)

    # Assert, worked by hand from m = 0 and v = tau^2 = 0.25:
    # m1 = 0.5 D1 = [0.25, -0.125]; v1 = 0.75 * 0.25 + 0.25 D1^2 = [0.25, 0.203125]
    # x1 = X0 + 0.1 m1 / (sqrt(v1) + 0.5)
    m1, v1 = [0.25, -0.125], [0.25, 0.203125]
    x1_hand = [1.0 + 0.1 * 0.25 / 1.0, -2.0 - 0.1 * 0.125 / (math.sqrt(0.203125) + 0.5)]
    # m2 = 0.5 m1 + 0.5 D2 = [0.25, 0.1875]; v2 = 0.75 v1 + 0.25 D2^2 = [0.203125, 0.21484375]
    m2, v2 = [0.25, 0.1875], [0.203125, 0.21484375]
    x2_hand = [x1_hand[i] + 0.1 * m2[i] / (math.sqrt(v2[i]) + 0.5) for i in range(2)]
    assert s1.moments[0].tolist() == m1 and s1.moments[1].tolist() == v1
    assert s2.moments[0].tolist() == m2 and s2.moments[1].tolist() == v2
    assert x1.tolist() == pytest.approx(x1_hand, abs=1e-15)
    assert x2.tolist() == pytest.approx(x2_hand, abs=1e-15)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_a_state_read_back_steps_on_exactly_as_the_one_kept(name: str) -> None:
    # Prepare: three rounds of one optimiser
    rng = np.random.default_rng(2)
    terms = OptimiserTerms(name)
    params, state = rng.normal(size=5), OptimiserState()
    for _ in range(3):
        params, state = server_step(terms, params, rng.normal(size=5), state)
    delta = rng.normal(size=5)

    # Execute
    again = OptimiserState.from_bytes(state.to_bytes())

    # Assert
    kept, _ = server_step(terms, params, delta, state)
    read, _ = server_step(terms, params, delta, again)
    assert again.steps == 3 and np.array_equal(kept, read)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 15, OptimiserState(1, (np.ones(3),)).to_bytes()[:-1]],
)
def test_a_damaged_state_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        OptimiserState.from_bytes(data)


def test_a_state_of_another_model_size_is_refused() -> None:
    state = OptimiserState(1, (np.ones(3),))

    with pytest.raises(ValueError, match="another size"):
        server_step(OptimiserTerms("fedavgm"), X0, D1, state)


@pytest.mark.parametrize(
    "terms",
    [
        {"name": "sgd"},
        {"learning_rate": 0.0},
        {"learning_rate": math.inf},
        {"momentum": 1.0},
        {"beta1": -0.1},
        {"beta2": 1.0},
        {"tau": 0.0},
    ],
)
def test_invalid_terms_are_refused_by_name(terms: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(terms))):
        OptimiserTerms(**terms)  # type: ignore[arg-type]


def test_the_owner_rounds_and_averages_before_stepping() -> None:
    # Prepare: a spec with FedAvgM, a decrypted total of two updates with CKKS-like noise
    spec = _spec(optimiser=OptimiserTerms("fedavgm", learning_rate=1.0, momentum=0.5))
    total = np.array([1.0 + 3e-9, -0.5 - 2e-9, 0.25, 0.0, 2.0])

    # Execute
    params, state = next_model(spec, np.zeros(5), OptimiserState(), total, 2)

    # Assert: the noise is rounded away before the mean reaches the optimiser
    assert RELEASE_DECIMALS < 9
    assert params.tolist() == [0.5, -0.25, 0.125, 0.0, 1.0]
    assert state.moments[0].tolist() == params.tolist()


def test_the_model_store_keeps_each_model_with_its_optimiser_state(tmp_path: Path) -> None:
    # Prepare
    store = ModelStore(tmp_path / "models")
    _, state = server_step(OptimiserTerms("fedadam"), X0, D1, OptimiserState())

    # Execute
    store.put(1, X0 + D1, state)
    (tmp_path / "models" / "2.model").write_bytes((X0 + D2).astype("<f8").tobytes())

    # Assert: read back exactly; a model stored without a state is refused, not guessed at
    again = ModelStore(tmp_path / "models")
    assert again.state(1).to_bytes() == state.to_bytes()
    assert np.array_equal(again.all(2)[1], X0 + D1)
    with pytest.raises(ProtocolError, match="model 2 is stored without its optimiser state"):
        again.state(2)


def test_the_task_file_names_the_optimiser(tmp_path: Path) -> None:
    # Prepare: the shipped task file with an [optimiser] table
    shipped = (Path(__file__).resolve().parents[1] / "deploy" / "task.toml").read_text()
    path = tmp_path / "task.toml"
    path.write_text(
        shipped.split("[optimiser]")[0]
        + '[optimiser]\nname = "fedadam"\nlearning_rate = 1\ntau = 0.1\n'
    )

    # Execute
    spec = load_task_file(path, task="0x" + "11" * 32, context_hash="0x" + "22" * 32)

    # Assert: named terms taken, the rest left at their defaults, all in the signed spec
    assert spec.optimiser == OptimiserTerms("fedadam", learning_rate=1.0, tau=0.1)
    assert TaskSpec.decode(spec.encode()).optimiser == spec.optimiser


def test_the_shipped_task_file_keeps_plain_federated_averaging() -> None:
    path = Path(__file__).resolve().parents[1] / "deploy" / "task.toml"

    spec = load_task_file(path, task="0x" + "11" * 32, context_hash="0x" + "22" * 32)

    assert spec.optimiser == OptimiserTerms()


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('name = "adagrad"', "name"),
        ("momentum = 1.5", "momentum"),
        ('tau = "small"', "optimiser.tau has the wrong type"),
        ("nesterov = true", "nesterov"),
    ],
)
def test_a_bad_optimiser_table_is_refused_by_name(tmp_path: Path, table: str, error: str) -> None:
    shipped = (Path(__file__).resolve().parents[1] / "deploy" / "task.toml").read_text()
    path = tmp_path / "task.toml"
    path.write_text(shipped.split("[optimiser]")[0] + f"[optimiser]\n{table}\n")

    with pytest.raises(ConfigError, match=error):
        load_task_file(path, task="0x" + "11" * 32, context_hash="0x" + "22" * 32)


def _spec(**terms: object) -> TaskSpec:
    fields: dict[str, object] = {
        "task": "0x" + "11" * 32,
        "rounds": 3,
        "quorum": 1,
        "he_profile": "ckks-4096-60-49",
        "context_hash": "0x" + "22" * 32,
        "feature_offsets": (0.0,) * 4,
        "feature_scales": (1.0,) * 4,
    }
    return TaskSpec(**{**fields, **terms})  # type: ignore[arg-type]

"""Provisioning writes a CA, certificates that chain to it, 0600 secrets, logins hashed by
mosquitto_passwd, an ACL and a configuration, and a second run keeps what the first issued."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from truscl.broker.provision import Provisioned, acl_text, provision_broker
from truscl.cli import main
from truscl.config import TomlReader
from truscl.errors import ConfigError, TrusclError

DEVICE_A = "0x" + "Ab" * 20
DEVICE_B = "0x" + "0c" * 20
DEVICE_C = "0x" + "de" * 20
TASK = "0x" + "5e" * 32


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def grants(acl: str) -> dict[str, set[str]]:
    """Each user's ``topic`` lines of an ACL, comments and blank lines left out."""
    found: dict[str, set[str]] = {}
    user = ""
    for line in acl.splitlines():
        if line.startswith("user "):
            user = line.removeprefix("user ")
            found[user] = set()
        elif line.startswith("topic "):
            found[user].add(line)
    return found


@pytest.fixture()
def provisioned(tmp_path: Path) -> Provisioned:
    return provision_broker(tmp_path / "broker", [DEVICE_A, DEVICE_B], port=18883)


def test_every_identity_gets_a_folder_and_every_secret_is_0600(provisioned: Provisioned) -> None:
    out = provisioned.out
    a = DEVICE_A.lower()
    assert provisioned.identities == ("aggregator", "owner", DEVICE_B.lower(), a)
    assert set(provisioned.added) == set(provisioned.identities)
    for secret in (out / "ca.key", out / "broker.key", out / "passwd"):
        assert mode(secret) == 0o600, secret
    for name in provisioned.identities:
        folder = out / "clients" / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "broker.toml", "ca.crt", "client.crt", "client.key", "password",
        ]  # fmt: skip
        assert mode(folder / "client.key") == 0o600
        assert mode(folder / "password") == 0o600
        assert len((folder / "password").read_text()) >= 40
    passwords = {(out / "clients" / n / "password").read_text() for n in provisioned.identities}
    assert len(passwords) == len(provisioned.identities)
    assert not list(out.rglob(".*")), "a staging file was left behind"


def test_certificates_chain_to_the_ca_with_the_broker_names(provisioned: Provisioned) -> None:
    out = provisioned.out
    ca = certificate(out / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    broker = certificate(out / "broker.crt")
    broker.verify_directly_issued_by(ca)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    usage = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in provisioned.identities:
        client = certificate(out / "clients" / name / "client.crt")
        client.verify_directly_issued_by(ca)
        assert client.subject.rfc4514_string().startswith(f"CN={name},")
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (out / "clients" / name / "ca.crt").read_bytes() == (out / "ca.crt").read_bytes()


def test_broker_toml_is_a_ready_table_for_the_project_reader(provisioned: Provisioned) -> None:
    for name in provisioned.identities:
        path = provisioned.client_dir(name) / "broker.toml"
        reader = TomlReader.load(path)
        assert reader.broker() == provisioned.settings(name, host="127.0.0.1")
        reader.no_leftovers()
    assert provisioned.settings("owner").username == "owner"


def test_passwords_are_hashed_by_mosquitto_passwd(provisioned: Provisioned) -> None:
    lines = provisioned.password_file.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == list(provisioned.identities)
    assert all(line.split(":", 1)[1].startswith("$7$") for line in lines)
    text = provisioned.password_file.read_text()
    for name in provisioned.identities:
        assert (provisioned.client_dir(name) / "password").read_text() not in text


def test_the_configuration_requires_both_factors(provisioned: Provisioned) -> None:
    out = provisioned.out
    lines = provisioned.conf.read_text().splitlines()
    for line in (
        "listener 18883 0.0.0.0",
        f"cafile {out / 'ca.crt'}",
        f"certfile {out / 'broker.crt'}",
        f"keyfile {out / 'broker.key'}",
        "require_certificate true",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "use_username_as_clientid true",
        "persistence true",
        f"persistence_location {out / 'data'}/",
        f"log_dest file {out / 'mosquitto.log'}",
        "max_queued_messages 10000",
    ):
        assert line in lines, line


def test_a_second_run_keeps_the_ca_and_identities_and_adds_devices(
    provisioned: Provisioned,
) -> None:
    out = provisioned.out
    kept = [out / "ca.crt", out / "ca.key", out / "broker.key", out / "broker.crt"]
    for name in provisioned.identities:
        kept += [out / "clients" / name / f for f in ("client.crt", "client.key", "password")]
    before = {path: path.read_bytes() for path in kept}

    again = provision_broker(out, [DEVICE_C], port=18883)

    assert {path: path.read_bytes() for path in kept} == before
    assert again.added == (DEVICE_C.lower(),)
    assert set(again.identities) == {*provisioned.identities, DEVICE_C.lower()}
    hashed = [line.split(":", 1)[0] for line in again.password_file.read_text().splitlines()]
    assert sorted(hashed) == sorted(again.identities)
    acl = again.acl.read_text()
    for name in again.identities:
        assert f"user {name}\n" in acl
    certificate(out / "clients" / DEVICE_C.lower() / "client.crt").verify_directly_issued_by(
        certificate(out / "ca.crt")
    )


def test_new_host_names_reissue_only_the_broker_certificate(provisioned: Provisioned) -> None:
    out = provisioned.out
    ca, key = (out / "ca.crt").read_bytes(), (out / "broker.key").read_bytes()

    provision_broker(out, [], hosts=("broker.lan", "10.0.0.2"), port=18883)

    assert (out / "ca.crt").read_bytes() == ca and (out / "broker.key").read_bytes() == key
    broker = certificate(out / "broker.crt")
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.2")]
    assert 'host = "broker.lan"' in (out / "clients" / "owner" / "broker.toml").read_text()


def test_an_aggregator_of_three_workers_gets_three_logins_under_its_acl(
    provisioned: Provisioned,
) -> None:
    out = provisioned.out
    folder = out / "clients" / "aggregator"

    three = provision_broker(out, [], port=18883, aggregator_workers=3)
    passwords = {n: (folder / f"password-{n}").read_bytes() for n in (1, 2)}
    again = provision_broker(out, [], port=18883)  # a run that does not say: they stay

    assert three.aggregator_workers == again.aggregator_workers == 3
    assert {n: (folder / f"password-{n}").read_bytes() for n in (1, 2)} == passwords
    assert all(mode(folder / f"password-{n}") == 0o600 for n in (1, 2))
    hashed = [line.split(":", 1)[0] for line in again.password_file.read_text().splitlines()]
    assert sorted(hashed) == sorted([*again.identities, "aggregator-1", "aggregator-2"])
    blocks = grants(again.acl.read_text())
    assert blocks["aggregator-1"] == blocks["aggregator-2"] == blocks["aggregator"]
    worker = provisioned.settings("aggregator").worker(2)
    assert (worker.username, worker.password_file) == ("aggregator-2", folder / "password-2")
    assert worker.cert == folder / "client.crt"  # the aggregator's certificate


def test_the_acl_gives_each_role_only_its_topics() -> None:
    a = DEVICE_A.lower()
    text = acl_text(("aggregator", "owner", a), task=TASK)
    blocks = grants(text)
    base = f"truscl/v1/{TASK}"
    assert blocks[a] == {
        f"topic write {base}/updates/{a}",
        f"topic read {base}/receipts/{a}",
        f"topic read {base}/spec",
        f"topic read {base}/context/+",
        f"topic read {base}/round",
        f"topic read {base}/model",
    }
    assert f"topic read {base}/updates/+" in blocks["aggregator"]
    assert not [line for line in blocks["owner"] if "updates" in line or "receipts" in line]
    assert "truscl/v1/+/" not in text
    assert "topic read truscl/v1/+/updates/+" in acl_text(("aggregator",))


@pytest.mark.parametrize(
    ("devices", "kwargs", "message"),
    [
        (["0x1234"], {}, "not a device address"),
        (["ab" * 20], {}, "not a device address"),
        ([DEVICE_A], {"task": "0x12"}, "not a task id"),
        ([DEVICE_A], {"port": 0}, "not a TCP port"),
        ([DEVICE_A], {"hosts": ()}, "at least one host"),
    ],
)
def test_malformed_input_is_refused_before_anything_is_written(
    tmp_path: Path, devices: list[str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        provision_broker(tmp_path / "broker", devices, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "broker").exists()


def test_a_missing_mosquitto_passwd_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="mosquitto_passwd is not installed") as caught:
        provision_broker(tmp_path / "broker", [DEVICE_A])
    assert isinstance(caught.value, TrusclError) and isinstance(caught.value, ValueError)
    assert not (tmp_path / "broker").exists()


def test_a_foreign_folder_among_the_clients_is_refused(provisioned: Provisioned) -> None:
    (provisioned.out / "clients" / "mallory").mkdir()
    with pytest.raises(ConfigError, match="not an identity this tool issued"):
        provision_broker(provisioned.out, [DEVICE_A], port=18883)


def test_the_cli_provisions_and_says_how_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "broker"
    argv = ["broker", "provision", "--out", str(out), "--devices", DEVICE_A, DEVICE_B,
            "--host", "broker.lan", "--port", "18884", "--task", TASK]  # fmt: skip

    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert f"mosquitto -c {out.resolve() / 'mosquitto.conf'}" in printed
    for name in ("aggregator", "owner", DEVICE_A.lower(), DEVICE_B.lower()):
        assert f"identity {name} (new)" in printed
    assert "listener 18884 0.0.0.0" in (out / "mosquitto.conf").read_text()
    assert f"truscl/v1/{TASK}/spec" in (out / "acl").read_text()
    for name in ("aggregator", "owner"):
        assert (out / "clients" / name / "password").read_text() not in printed
    with pytest.raises(SystemExit):
        main(["broker", "provision", "--out", str(out), "--devices", "0xnope"])


REFERENCE = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
# Lines whose value is a path or a name of the machine it is installed on.
LOCAL = ("user", "password_file", "acl_file", "persistence_location", "log_dest", "cafile",
         "certfile", "keyfile", "listener")  # fmt: skip


def directives(conf: str) -> list[str]:
    lines = [line for line in conf.splitlines() if line.strip() and not line.startswith("#")]
    return [line.split()[0] if line.split()[0] in LOCAL else line for line in lines]


def test_the_reference_files_match_what_provisioning_writes(provisioned: Provisioned) -> None:
    reference = (REFERENCE / "mosquitto.conf").read_text()
    assert directives(reference) == directives(provisioned.conf.read_text())
    example = grants((REFERENCE / "acl").read_text())
    assert example == grants(acl_text(tuple(example)))
    assert list(example)[:2] == ["aggregator", "owner"]

"""Provision a deployment's mosquitto: a test CA, certificates, logins, an ACL and a config.

A fleet's broker must know who is talking (a device may only publish its own updates, read its
own receipts) and the network between the Pis and the broker must not see or forge traffic.
mosquitto does both with two factors that this module issues together for every identity: a
client certificate signed by the deployment's own CA (TLS with ``require_certificate``) and a
random password registered with ``mosquitto_passwd``. Each identity is a folder under
``clients/`` that is copied whole to its machine, with a ready ``[broker]`` table.

An aggregator of several worker processes (``workers`` in its configuration) needs a login
per process, because the broker makes each login its client id: ``aggregator-1`` ... log in
with the aggregator's certificate and the passwords ``password-1`` ... in the aggregator's
folder, under the aggregator's ACL.

Re-running on the same folder keeps the CA, the broker's key and every identity already issued
(so provisioned devices keep working) and adds the new devices; the ACL, the password file and
the configuration are rewritten from the identities found.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from truscl.errors import ConfigError
from truscl.files import write_atomically
from truscl.keyfile import read_secret, write_secret
from truscl.mqtt import BrokerSettings
from truscl.wire.topics import PREFIX

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
TASK = re.compile(r"0x[0-9a-fA-F]{64}")
AGGREGATOR = "aggregator"
OWNER = "owner"
ROLES = (AGGREGATOR, OWNER)
GUARDIAN = re.compile(r"guardian-[1-9][0-9]*")  # key guardians: guardian-1, guardian-2, ...
WORKER_PASSWORD = re.compile(r"password-([1-9][0-9]*)")  # the aggregator's further logins

CA_DAYS = 3650
LEAF_DAYS = 1825
# File names inside the provisioned folder and inside each client's folder.
CA_CERT, CA_KEY = "ca.crt", "ca.key"
BROKER_CERT, BROKER_KEY = "broker.crt", "broker.key"
CONF, ACL, PASSWD, LOG, PERSISTENCE = "mosquitto.conf", "acl", "passwd", "mosquitto.log", "data"
CLIENT_CERT, CLIENT_KEY, CLIENT_PASSWORD, CLIENT_TOML = (
    "client.crt",
    "client.key",
    "password",
    "broker.toml",
)


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision_broker` wrote, and how each identity reaches the broker."""

    out: Path
    port: int
    hosts: tuple[str, ...]
    identities: tuple[str, ...]  # every identity the broker now knows, roles first
    added: tuple[str, ...]  # the identities this run issued
    aggregator_workers: int = 1  # the aggregator's logins: its own and aggregator-1 ...

    @property
    def conf(self) -> Path:
        return self.out / CONF

    @property
    def acl(self) -> Path:
        return self.out / ACL

    @property
    def password_file(self) -> Path:
        """mosquitto's file of password hashes (the clients' passwords are in their folders)."""
        return self.out / PASSWD

    @property
    def ca(self) -> Path:
        return self.out / CA_CERT

    @property
    def log(self) -> Path:
        return self.out / LOG

    def client_dir(self, name: str) -> Path:
        if name not in self.identities:
            raise ConfigError(f"{name!r} is not an identity of the broker in {self.out}")
        return self.out / "clients" / name

    def settings(self, name: str, host: str = "127.0.0.1") -> BrokerSettings:
        """How identity ``name`` reaches the broker at ``host`` (a name its certificate holds)."""
        folder = self.client_dir(name)
        return BrokerSettings(
            host=host,
            port=self.port,
            ca=folder / CA_CERT,
            cert=folder / CLIENT_CERT,
            key=folder / CLIENT_KEY,
            username=name,
            password_file=folder / CLIENT_PASSWORD,
        )


def provision_broker(
    out: Path,
    devices: Sequence[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    port: int = 8883,
    bind: str = "0.0.0.0",
    task: str | None = None,
    guardians: int = 0,
    aggregator_workers: int = 1,
) -> Provisioned:
    """Write (or extend) a provisioned broker in ``out`` for ``devices``, the aggregator (with
    a login for each of its ``aggregator_workers`` processes; those of an earlier run are
    kept), the owner and ``guardians`` key guardians (``guardian-1`` ...: threshold mode needs
    at least one); ``hosts`` are the names clients use for the broker (its certificate holds
    them all, the first goes into the clients' ``broker.toml``); ``task`` limits the ACL to one
    task."""
    # Everything is checked before anything is written, so a refusal leaves ``out`` as it was.
    names = [_device_name(d) for d in devices]
    hosts = tuple(hosts)
    if not hosts or any(not h or any(c.isspace() for c in h) for h in hosts):
        raise ConfigError("the broker needs at least one host name, without spaces")
    if not 0 < port < 65536:
        raise ConfigError(f"{port} is not a TCP port")
    if not bind or any(c.isspace() for c in bind):
        raise ConfigError(f"{bind!r} is not an address to bind to")
    if task is not None and not TASK.fullmatch(task):
        raise ConfigError(f"{task!r} is not a task id (0x and 64 hex digits)")
    if guardians < 0:
        raise ConfigError("the number of guardians must not be negative")
    if aggregator_workers < 1:
        raise ConfigError("the aggregator has at least one worker process")
    passwd_tool = shutil.which("mosquitto_passwd")
    if passwd_tool is None:
        raise ConfigError(
            "mosquitto_passwd is not installed (Debian: apt-get install mosquitto); "
            "it registers the identities' passwords"
        )
    out = Path(out).resolve()
    clients = out / "clients"
    existing = _existing_identities(clients)

    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _load_or_create_ca(out)
    _ensure_broker_certificate(out, ca_key, ca_cert, hosts)
    guardian_names = [f"guardian-{n}" for n in range(1, guardians + 1)]
    wanted = [*ROLES, *guardian_names, *dict.fromkeys(names)]
    added = []
    for name in wanted:
        if name not in existing:
            _issue_identity(clients, name, ca_key, ca_cert)
            added.append(name)
    everyone = set(existing) | set(guardian_names) | set(names)
    identities = (
        *ROLES,
        *sorted((n for n in everyone if GUARDIAN.fullmatch(n)), key=lambda n: int(n[9:])),
        *sorted(n for n in everyone if _is_device_name(n)),
    )
    for name in identities:
        _check_identity(clients / name, name, ca_cert)
        _write_client_toml(clients / name, hosts[0], port)
    workers = _worker_passwords(clients / AGGREGATOR, aggregator_workers)
    logins = {name: clients / name / CLIENT_PASSWORD for name in identities}
    logins.update({f"{AGGREGATOR}-{n}": password for n, password in workers.items()})

    _register_passwords(out, logins, passwd_tool)
    write_atomically(out / ACL, acl_text(tuple(logins), task).encode(), 0o644)
    write_atomically(out / CONF, conf_text(out, port, bind).encode(), 0o644)
    (out / PERSISTENCE).mkdir(mode=0o700, exist_ok=True)
    return Provisioned(out, port, hosts, identities, tuple(added), len(workers) + 1)


def _worker_passwords(folder: Path, workers: int) -> dict[int, Path]:
    """The password files of the aggregator's logins beyond its own, by worker: those an
    earlier run issued, and new ones up to ``workers`` processes in all."""
    for n in range(1, workers):
        if not (folder / f"{CLIENT_PASSWORD}-{n}").is_file():
            write_secret(folder / f"{CLIENT_PASSWORD}-{n}", secrets.token_urlsafe(32).encode())
    found = {}
    for entry in folder.iterdir():
        if matched := WORKER_PASSWORD.fullmatch(entry.name):
            found[int(matched[1])] = entry
    return dict(sorted(found.items()))


def _device_name(address: str) -> str:
    if not isinstance(address, str) or not ADDRESS.fullmatch(address):
        raise ConfigError(f"{address!r} is not a device address (0x and 40 hex digits)")
    return address.lower()


def _existing_identities(clients: Path) -> list[str]:
    """The identities already issued: a folder under clients/ that is a role, a guardian or an
    address."""
    if not clients.is_dir():
        return []
    found = []
    for entry in sorted(clients.iterdir()):
        if entry.name.startswith("."):
            continue  # an identity being issued when a run stopped: issued again
        known = entry.name in ROLES or GUARDIAN.fullmatch(entry.name) or _is_device_name(entry.name)
        if not entry.is_dir() or not known:
            raise ConfigError(f"{entry} is not an identity this tool issued; move it away")
        found.append(entry.name)
    return found


def _is_device_name(name: str) -> bool:
    return ADDRESS.fullmatch(name) is not None and name == name.lower()


# -- certificates -------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    """P-256: small and fast on a Pi, and every TLS stack the fleet uses speaks it."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # mosquitto and paho load the key unattended
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "truscl"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_or_create_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() != key_path.exists():
        raise ConfigError(f"{out}: {CA_CERT} and {CA_KEY} must both be there, or neither")
    if cert_path.exists():
        key = serialization.load_pem_private_key(read_secret(key_path), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ConfigError(f"{key_path} is not the key of {cert_path}")
        return key, cert
    key = _new_key()
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("truscl test CA"))
        .issuer_name(_name("truscl test CA"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_secret(key_path, _key_pem(key))  # the key first: a certificate alone is refused
    write_atomically(cert_path, _cert_pem(cert), 0o644)
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs (a TLS client checks an IP against those, never a DNS name)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _san_of(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` was issued by ``ca_cert`` and is in its validity period now."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = _now()
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _ensure_broker_certificate(
    out: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> None:
    """Keep the broker's key; issue its certificate again only when the host names changed (or
    it no longer verifies), since clients check the broker against the CA, not this file."""
    key_path, cert_path = out / BROKER_KEY, out / BROKER_CERT
    if key_path.exists():
        key = serialization.load_pem_private_key(read_secret(key_path), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an elliptic-curve key")
    else:
        key = _new_key()
        write_secret(key_path, _key_pem(key))
    wanted = set(_host_names(hosts))
    if cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if (
            signed_by(cert, ca_cert)
            and cert.public_key() == key.public_key()
            and _san_of(cert) == wanted
        ):
            return
    cert = _leaf(ca_key, ca_cert, key, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, list(wanted))
    write_atomically(cert_path, _cert_pem(cert), 0o644)


def _issue_identity(
    clients: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> None:
    """A folder with the CA, a client certificate and key, and a password, made under a hidden
    name and renamed whole, so a stopped run never leaves half an identity."""
    staging = clients / f".{name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, mode=0o700)
    key = _new_key()
    write_secret(staging / CLIENT_KEY, _key_pem(key))
    cert = _leaf(ca_key, ca_cert, key, name, ExtendedKeyUsageOID.CLIENT_AUTH)
    write_atomically(staging / CLIENT_CERT, _cert_pem(cert), 0o644)
    write_secret(staging / CLIENT_PASSWORD, secrets.token_urlsafe(32).encode())
    os.rename(staging, clients / name)


def _check_identity(folder: Path, name: str, ca_cert: x509.Certificate) -> None:
    for file in (CLIENT_CERT, CLIENT_KEY, CLIENT_PASSWORD):
        if not (folder / file).is_file():
            raise ConfigError(f"{folder}: {file} is missing; move the folder away to reissue")
    cert = x509.load_pem_x509_certificate((folder / CLIENT_CERT).read_bytes())
    if not signed_by(cert, ca_cert):
        raise ConfigError(f"{folder / CLIENT_CERT} is not a current certificate of this CA")
    key = serialization.load_pem_private_key(read_secret(folder / CLIENT_KEY), password=None)
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{folder / CLIENT_KEY} is not the key of {folder / CLIENT_CERT}")
    write_atomically(folder / CA_CERT, _cert_pem(ca_cert), 0o644)


def _write_client_toml(folder: Path, host: str, port: int) -> None:
    """Paths relative to the file's folder (the TOML reader resolves them there), so the folder
    can be copied anywhere on the client."""
    write_atomically(
        folder / CLIENT_TOML,
        (
            "# Written by `truscl broker provision`: this client's way to the broker.\n"
            "[broker]\n"
            f'host = "{host}"\n'
            f"port = {port}\n"
            f'ca = "{CA_CERT}"\n'
            f'cert = "{CLIENT_CERT}"\n'
            f'key = "{CLIENT_KEY}"\n'
            f'username = "{folder.name}"\n'
            f'password_file = "{CLIENT_PASSWORD}"\n'
        ).encode(),
        0o644,
    )


# -- mosquitto's files --------------------------------------------------------------------------


def _register_passwords(out: Path, logins: dict[str, Path], passwd_tool: str) -> None:
    """mosquitto_passwd hashes the passwords (``-U`` over a 0600 file of ``name:password``
    lines, so no password is ever on a command line that ``ps`` shows); the result replaces
    the password file whole. ``logins``: each login's password file."""
    staging = out / f".{PASSWD}.new"
    staging.unlink(missing_ok=True)
    lines = b"".join(
        name.encode() + b":" + read_secret(password).strip() + b"\n"
        for name, password in logins.items()
    )
    write_secret(staging, lines)
    try:
        done = subprocess.run(
            [passwd_tool, "-U", str(staging)], capture_output=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise ConfigError(
                f"mosquitto_passwd failed ({done.returncode}): {done.stderr.decode().strip()}"
            )
        hashed = read_secret(staging)
        if hashed.count(b":$") != len(logins):
            raise ConfigError("mosquitto_passwd did not hash every password")
        write_atomically(out / PASSWD, hashed, 0o600)
    finally:
        staging.unlink(missing_ok=True)


def acl_text(identities: Sequence[str], task: str | None = None) -> str:
    """mosquitto's ACL: each identity only the topics of truscl.wire.topics its role uses.

    Anything not granted is denied; a denied publish is dropped by the broker (a QoS 1 one may
    still be acknowledged) and a denied read is never delivered.
    """
    base = f"{PREFIX}/{'+' if task is None else task.lower()}"
    scope = "any task" if task is None else f"task {task.lower()}"
    lines = [
        "# Written by `truscl broker provision`; rewritten on every run.",
        f"# Topics of {scope}; what is not granted here is denied.",
        "",
    ]
    reads_task = ("spec", "context/+", "round", "model")
    for name in identities:
        if name.split("-")[0] == AGGREGATOR:  # the aggregator, or one of its worker processes
            lines += [
                "# The aggregator collects every device's update, and answers with receipts,",
                "# the round announcement and the encrypted aggregate for the owner.",
                f"user {name}",
                f"topic read {base}/updates/+",
                *(f"topic read {base}/{t}" for t in ("spec", "context/+", "model")),
                *(f"topic write {base}/{t}" for t in ("round", "receipts/+", "aggregate")),
            ]
        elif name == OWNER:
            lines += [
                "# The owner publishes the task and its models and reads only the aggregate:",
                "# no device's update, and it writes no receipt. As a key holder it writes its",
                "# own keygen messages and reads every holder's, and the guardians' partials.",
                f"user {name}",
                *(f"topic readwrite {base}/{t}" for t in ("spec", "context/+", "model")),
                *(f"topic read {base}/{t}" for t in ("round", "aggregate")),
                f"topic write {base}/keygen/{name}/+/+",
                f"topic read {base}/keygen/+/+/+",
                f"topic read {base}/partials/+/+",
            ]
        elif GUARDIAN.fullmatch(name):
            lines += [
                "# A key guardian: the task's public topics and the aggregate (no device's",
                "# update), every holder's keygen messages; it writes only its own keygen",
                "# messages and its own partial decryptions.",
                f"user {name}",
                *(f"topic read {base}/{t}" for t in (*reads_task, "aggregate")),
                f"topic read {base}/keygen/+/+/+",
                f"topic write {base}/keygen/{name}/+/+",
                f"topic write {base}/partials/{name}/+",
            ]
        else:
            lines += [
                "# A device: its own update and receipts, and the task's public topics.",
                f"user {name}",
                f"topic write {base}/updates/{name}",
                f"topic read {base}/receipts/{name}",
                *(f"topic read {base}/{t}" for t in reads_task),
            ]
        lines.append("")
    return "\n".join(lines)


def conf_text(out: Path, port: int, bind: str) -> str:
    """mosquitto.conf for the provisioned folder (absolute paths: mosquitto resolves relative
    ones against its working directory, not the file's). deploy/mosquitto/mosquitto.conf is the
    same file with each line explained."""
    out = Path(out).resolve()
    return (
        "# Written by `truscl broker provision`; rewritten on every run.\n"
        "# Run in the foreground with: mosquitto -c " + str(out / CONF) + "\n"
        "# mosquitto started as root switches to this user: the one that owns the keys below.\n"
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {out / PASSWD}\n"
        f"acl_file {out / ACL}\n"
        "persistence true\n"
        f"persistence_location {out / PERSISTENCE}/\n"
        "max_queued_messages 10000\n"
        f"log_dest file {out / LOG}\n"
        "log_type error\n"
        "log_type warning\n"
        "log_type notice\n"
        "log_type information\n"
        "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
        "\n"
        f"listener {port} {bind}\n"
        "protocol mqtt\n"
        f"cafile {out / CA_CERT}\n"
        f"certfile {out / BROKER_CERT}\n"
        f"keyfile {out / BROKER_KEY}\n"
        "tls_version tlsv1.2\n"
        "require_certificate true\n"
        "use_identity_as_username false\n"
        "use_username_as_clientid true\n"
    )

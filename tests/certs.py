"""Certificates for TLS tests, made with the openssl command line in a directory the
test owns (its tmp_path): a CA, and certificates it signs for IP addresses, each
usable by a server and by a client (mutual TLS)."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DAYS = "2"
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {p.stderr.strip()[:300]}")


@dataclass(frozen=True)
class Cert:
    cert: str           # PEM certificate
    key: str            # PEM private key


class CA:
    """A self-signed CA called `name` in `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.name = Path(directory), name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")
        self.serial = 0
        _openssl("req", "-x509", *_NEW_KEY, "-keyout", self.key, "-out", self.cert, "-days", DAYS,
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, ips: Sequence[str] = ("127.0.0.1",), common_name: bool = True) -> Cert:
        """A certificate for `name` with the IP addresses `ips` (subjectAltName), signed by this CA.
        common_name=False: the name goes in O= instead of CN= (etcd's JSON gateway refuses a
        client certificate with a CommonName when auth is on)."""
        self.serial += 1
        key, csr, cert = (str(self.dir / f"{self.name}-{name}.{ext}") for ext in ("key", "csr", "pem"))
        ext = self.dir / f"{self.name}-{name}.ext"
        ext.write_text("basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n"
                       "extendedKeyUsage = serverAuth,clientAuth\n"
                       "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n"
                       + (f"subjectAltName = {','.join(f'IP:{ip}' for ip in ips)}\n" if ips else ""))
        _openssl("req", "-new", *_NEW_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}" if common_name else f"/O={name}")
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-set_serial", str(self.serial),
                 "-days", DAYS, "-out", cert, "-extfile", str(ext))
        return Cert(cert, key)

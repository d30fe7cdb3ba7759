"""A real S3 API on 127.0.0.1: moto's server (`moto[server]`, a dev dependency) in its own process, spoken to
over HTTP by boto3 exactly as a bucket in the cloud is. The remote-stream tests upload MDS splits with it and
train from `s3://...` through streaming's S3 downloader (which reads S3_ENDPOINT_URL).

Credentials are checked as on AWS: the server starts open, an IAM user with an access key and an S3 policy is
created, then authentication is switched on (moto's /moto-api/reset-auth), so a wrong key is refused with 403.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

REGION = "us-east-1"
S3_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


class S3Unavailable(RuntimeError):
    """moto's server cannot run here; the message says why in one line (the tests skip with it)."""


class LocalS3:
    """One moto server process; `start()` returns once it answers, `stop()` ends it by PID."""

    def __init__(self, log: Path) -> None:
        self.log = Path(log)
        self.endpoint = ""
        self.access_key = ""
        self.secret_key = ""
        self._proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "LocalS3":
        try:
            import boto3  # noqa: F401
            import flask  # noqa: F401  (what moto[server] adds to moto)
            import moto  # noqa: F401
        except ImportError as e:
            raise S3Unavailable(f"{e.name} is not installed: pip install -e '.[dev]' (moto[server], boto3)") from None
        from tests.conftest import free_port

        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's server did not come up on {self.endpoint}:\n"
                                       + self.log.read_text(errors="replace")[-2000:]) from None
                time.sleep(0.2)
        try:
            self._create_user()
            # From here on every request must carry a valid signature of an existing key, as on AWS.
            req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})  # a form body would be parsed away
            urllib.request.urlopen(req, timeout=10).read()
        except BaseException:
            self.stop()  # the fixture never gets to stop a server that failed to start
            raise
        return self

    def _create_user(self) -> None:
        """An IAM user allowed s3:*, and its access key (the only credentials the server will accept)."""
        iam = self._client("iam", "unused", "unused")
        iam.create_user(UserName="blip-train-tests")
        iam.put_user_policy(UserName="blip-train-tests", PolicyName="s3", PolicyDocument=json.dumps(S3_POLICY))
        key = iam.create_access_key(UserName="blip-train-tests")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def _client(self, service: str, access_key: str, secret_key: str):
        import boto3
        return boto3.session.Session().client(service, endpoint_url=self.endpoint, region_name=REGION,
                                               aws_access_key_id=access_key, aws_secret_access_key=secret_key)

    def client(self):
        """A boto3 S3 client with the valid credentials."""
        return self._client("s3", self.access_key, self.secret_key)

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        """Create `bucket` if needed and upload every file of `local` under `prefix`; returns s3://bucket/prefix."""
        s3 = self.client()
        if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=bucket)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def env(self, secret_key: Optional[str] = None) -> dict[str, str]:
        """The environment a training job gets: endpoint and credentials (`secret_key` replaces the valid one).
        No profile or config file of this machine may interfere."""
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # moto's server exits on SIGTERM
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

"""A real single-node OpenSearch 2.19 in one JVM, built from Maven Central jars.

The classpath is built once into ``.cache/opensearch/`` (``mvn dependency:copy-dependencies``
for the jars listed in ``tests/testbed/opensearch/pom.xml``, ``javac`` for EmbeddedNode.java)
and rebuilt only when the pom or the Java source changes (their hash is in ``stamp``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._proc import CACHE_DIR, ServiceError, ServiceProcess, log, run_checked, scratch_dir

PROJECT_DIR = Path(__file__).resolve().parent / "opensearch"
BUILD_DIR = CACHE_DIR / "opensearch"
MAIN_CLASS = "viewkeeper.testbed.EmbeddedNode"

#: JVM flags. The heap is small on purpose (2-core, shared machine); override the whole list
#: with VIEWKEEPER_TESTBED_OPENSEARCH_JAVA_OPTS (space-separated) if needed.
JVM_FLAGS = [
    "-Xms512m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:-UsePerfData",
    "-Xss1m",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
    "-Djna.nosys=true",
    "-Djava.locale.providers=SPI,COMPAT",
    "-Dio.netty.noUnsafe=true",
    "-Dio.netty.noKeySetOptimization=true",
    "-Dio.netty.recycler.maxCapacityPerThread=0",
    "-Dio.netty.allocator.numDirectArenas=0",
    "-Dlog4j.shutdownHookEnabled=false",
    "-Dlog4j2.disable.jmx=true",
    "-Dlog4j2.formatMsgNoLookups=true",
]


def _source_files() -> list[Path]:
    return [PROJECT_DIR / "pom.xml", *sorted((PROJECT_DIR / "src").rglob("*.java"))]


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(str(path.relative_to(PROJECT_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_tool(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"{tool} missing: apt-get install -y {package}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", package],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        found = shutil.which(tool)
        if found:
            return found
    raise ServiceError(
        f"{tool} not found: install Debian's {package} (Java 17 + Maven are needed to build "
        "the test OpenSearch node) or set VIEWKEEPER_TEST_OPENSEARCH_URL"
    )


def build_classpath(force: bool = False) -> str:
    """Return the JVM classpath, building it first if the pom or Java source changed."""
    wanted = _source_hash()
    stamp = BUILD_DIR / "stamp"
    with _locked(BUILD_DIR / ".lock"):
        if force or not stamp.is_file() or stamp.read_text().strip() != wanted:
            mvn = _require_tool("mvn", "maven")
            javac = _require_tool("javac", "openjdk-17-jdk-headless")
            log("building the OpenSearch test node classpath (mvn + javac), once")
            begin = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix="build-", dir=BUILD_DIR))
            try:
                run_checked(
                    [
                        mvn, "-B", "-q", "-f", str(PROJECT_DIR / "pom.xml"),
                        "dependency:copy-dependencies",
                        f"-DoutputDirectory={staging / 'lib'}",
                        "-DincludeScope=runtime",
                    ],
                    what="mvn dependency:copy-dependencies",
                )  # fmt: skip
                run_checked(
                    [
                        javac, "--release", "17", "-nowarn",
                        "-cp", str(staging / "lib" / "*"),
                        "-d", str(staging / "classes"),
                        *(str(p) for p in sorted((PROJECT_DIR / "src").rglob("*.java"))),
                    ],
                    what="javac EmbeddedNode",
                )  # fmt: skip
                for part in ("lib", "classes"):
                    shutil.rmtree(BUILD_DIR / part, ignore_errors=True)
                    (staging / part).rename(BUILD_DIR / part)
                stamp.write_text(wanted + "\n")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log(f"OpenSearch classpath built in {time.monotonic() - begin:.1f}s")
    return f"{BUILD_DIR / 'classes'}{os.pathsep}{BUILD_DIR / 'lib' / '*'}"


class OpenSearchNode(ServiceProcess):
    """OpenSearch 2.19 (one node, one JVM) on a free (or given) loopback HTTP port.

    Settings: discovery.type=single-node, netty4 http+transport on 127.0.0.1, transport on an
    ephemeral port, disk thresholds off, real-memory breaker off, script compilation rate
    limit off, no index.* defaults (so new indices get 1 shard + 1 replica: health is yellow,
    never green, unless an index sets number_of_replicas=0).

    Data lives in a temp dir kept across ``stop()``/``start()``: a restart brings the node
    back on the SAME port WITH its indices and stored scripts. ``wipe()`` (when stopped)
    empties the data; ``close()`` deletes it.
    """

    name = "opensearch"
    stop_timeout = 30.0
    start_timeout = 180.0

    def __init__(self, port: int | None = None, java_opts: Sequence[str] | None = None) -> None:
        super().__init__(port)
        env_opts = os.environ.get("VIEWKEEPER_TESTBED_OPENSEARCH_JAVA_OPTS")
        if java_opts is not None:
            self.java_opts = list(java_opts)
        elif env_opts:
            self.java_opts = env_opts.split()
        else:
            self.java_opts = list(JVM_FLAGS)
        self._home: Path | None = None
        self._classpath: str | None = None
        self.version: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        if self._home is None:
            self._home = scratch_dir("opensearch")
        return self._home

    def prepare(self) -> None:
        if self._classpath is None:
            self._classpath = build_classpath()
        self.home.mkdir(parents=True, exist_ok=True)

    def workdir(self) -> Path:
        return self.home

    def stdin_pipe(self) -> bool:
        return True  # EmbeddedNode --watch-stdin exits when the launcher goes away

    def command(self) -> Sequence[str]:
        assert self._classpath is not None
        java = _require_tool("java", "openjdk-17-jdk-headless")
        return [
            java,
            *self.java_opts,
            f"-Djava.io.tmpdir={self.home}",
            "-cp",
            self._classpath,
            MAIN_CLASS,
            str(self.port),
            str(self.home),
            "--watch-stdin",
        ]

    def is_ready(self) -> bool:
        try:
            health = self.request("GET", "/_cluster/health?wait_for_status=yellow&timeout=1s")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        if not isinstance(health, dict) or health.get("status") not in ("yellow", "green"):
            return False
        if self.version is None:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                info = self.request("GET", "/").get("version")
                if isinstance(info, dict):
                    self.version = str(info.get("number"))
        return True

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """A tiny JSON client for the launcher (tests use opensearch-py)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5.0) as resp:
            return json.loads(resp.read())

    def wipe(self) -> None:
        """Delete all data; only while stopped."""
        if self.is_running():
            raise ServiceError("wipe() needs the node stopped")
        if self._home is not None:
            shutil.rmtree(self._home / "data", ignore_errors=True)

    def cleanup(self) -> None:
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def rss_bytes(self) -> int | None:
        """Resident memory of the JVM (Linux /proc), for reports."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

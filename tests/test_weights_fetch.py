"""engine.models.hub.fetch: one download per node, atomic, hash-checked; real files served over
file:// and over HTTP from a local server thread (127.0.0.1, bounded waits), real processes."""
import collections
import glob
import hashlib
import http.server
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import megengine.hub.hub as mge_hub

from helpers import jpeg_bytes, photo_bgr
from engine.errors import UserError
from engine.models import hub, weights
from engine.models.hub import WeightsError, fetch, prefetch_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state_bytes(seed: int = 0) -> bytes:
    """A small but real state dict pickle (what the published files are)."""
    rng = np.random.default_rng(seed)
    return pickle.dumps({"fc.weight": rng.normal(size=(10, 8)).astype(np.float32),
                         "fc.bias": rng.normal(size=(10,)).astype(np.float32)})


def hashed_name(data: bytes, stem: str = "net_fbaug_70000") -> str:
    """The published naming: the file's sha256 prefix before the extension."""
    return "%s_%s.pkl" % (stem, hashlib.sha256(data).hexdigest()[:8])


def cache_files(home) -> list:
    folder = os.path.join(str(home), "serialized")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def temp_files(home) -> list:
    return [f for f in cache_files(home) if f.startswith(".tmp-")]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "mge_home"
    monkeypatch.setenv("MGE_HOME", str(h))
    monkeypatch.delenv(hub.SKIP_HASH_ENV, raising=False)
    return h


# --------------------------------------------------------------------------- a local HTTP server


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` by path; `modes[path]` is consumed one per request:
    ok | delay (1 s before answering) | truncate (half the body, then close) |
    stall (half the body, then wait for `release`)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {}
        self.modes = collections.defaultdict(list)
        self.gets = collections.Counter()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.server_address[1], path)


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 30  # a stuck client cannot hold a server thread forever

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.gets[self.path] += 1
            data = srv.files.get(self.path)
            mode = srv.modes[self.path].pop(0) if srv.modes[self.path] else "ok"
        if data is None:
            self.send_error(404)
            return
        if mode == "delay":
            time.sleep(1.0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode in ("truncate", "stall"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if mode == "stall":
                srv.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = Server()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    t.join(10)


# ------------------------------------------------------------------------------------- file://


def test_file_url_is_cached_under_the_hub_name_and_loads(tmp_path, home):
    data = state_bytes(1)
    src = tmp_path / hashed_name(data)
    src.write_bytes(data)
    url = src.as_uri()

    path = fetch(url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:6]
    assert path == os.path.join(mge_hub._get_megengine_home(), "serialized",
                                digest + "_" + src.name)
    assert open(path, "rb").read() == data
    ino = os.stat(path).st_ino
    assert fetch(url) == path and os.stat(path).st_ino == ino  # cached: not copied again
    state = weights.read(url)  # reading a URL goes through the same fetch
    np.testing.assert_array_equal(state["fc.weight"], pickle.loads(data)["fc.weight"])
    assert temp_files(home) == []


def test_file_url_with_wrong_hash_is_refused_and_not_kept(tmp_path, home):
    data = state_bytes(2)
    src = tmp_path / hashed_name(b"some other content")
    src.write_bytes(data)
    with pytest.raises(WeightsError) as exc:
        fetch(src.as_uri())
    msg = str(exc.value)
    assert "sha256 " + hashlib.sha256(data).hexdigest()[:16] in msg
    assert hashed_name(b"some other content")[-12:-4] in msg and "not kept" in msg
    assert isinstance(exc.value, UserError) and "\n" not in msg
    assert [f for f in cache_files(home) if not f.endswith(".lock")] == []


def test_names_without_a_hash_are_not_checked(tmp_path, home):
    src = tmp_path / "checkpoint.pkl"
    src.write_bytes(state_bytes(3))
    assert open(fetch(src.as_uri()), "rb").read() == state_bytes(3)


def test_expected_hash_prefix():
    assert hub.expected_hash_prefix("resnet50_fbaug_76254_4e14b7d1.pkl") == "4e14b7d1"
    assert hub.expected_hash_prefix(
        "https://data.megengine.org.cn/models/weights/resnext101_32x8d_fbaug_79520_80efb344.pkl"
    ) == "80efb344"
    assert hub.expected_hash_prefix("resnet18_normal_69796.pkl") is None  # 5 digits: no hash
    assert hub.expected_hash_prefix("checkpoint.pkl") is None
    for arch, name in hub.PRETRAINED_FILES.items():
        assert hub.expected_hash_prefix(hub.pretrained_url(arch)) == name[-12:-4]


# ---------------------------------------------------------------------------------------- HTTP


def test_http_download_once_then_cached(server, home):
    data = state_bytes(4)
    server.files["/w/" + hashed_name(data)] = data
    url = server.url("/w/" + hashed_name(data))
    p1 = fetch(url)
    p2 = fetch(url)
    assert p1 == p2 and open(p1, "rb").read() == data
    assert server.gets["/w/" + hashed_name(data)] == 1


def test_http_hash_mismatch_refused(server, home):
    name = "/w/" + hashed_name(b"the published bytes")
    server.files[name] = state_bytes(5)
    with pytest.raises(WeightsError, match="sha256"):
        fetch(server.url(name))
    assert [f for f in cache_files(home) if not f.endswith(".lock")] == []


def test_skip_hash_env_accepts_with_a_warning(server, home, monkeypatch, capfd):
    name = "/w/" + hashed_name(b"the published bytes")
    server.files[name] = state_bytes(5)
    monkeypatch.setenv(hub.SKIP_HASH_ENV, "1")
    path = fetch(server.url(name))
    assert open(path, "rb").read() == state_bytes(5)
    assert "warning:" in capfd.readouterr().err


def test_cached_file_with_wrong_hash_is_downloaded_again(server, home):
    data = state_bytes(6)
    name = "/w/" + hashed_name(data)
    server.files[name] = data
    url = server.url(name)
    dest = hub.cache_path_for_url(url)
    os.makedirs(os.path.dirname(dest))
    with open(dest, "wb") as f:
        f.write(data[:100])  # what a non-atomic, interrupted download would have left
    assert fetch(url) == dest and open(dest, "rb").read() == data
    assert server.gets[name] == 1


def test_truncated_download_leaves_no_file(server, home):
    data = state_bytes(7)
    name = "/w/" + hashed_name(data)
    server.files[name] = data
    server.modes[name] = ["truncate"]
    with pytest.raises(WeightsError, match="stopped after"):
        fetch(server.url(name))
    assert [f for f in cache_files(home) if not f.endswith(".lock")] == []
    # the same happens to a file whose name carries no hash: the length is checked too
    server.files["/w/plain.pkl"] = data
    server.modes["/w/plain.pkl"] = ["truncate"]
    with pytest.raises(WeightsError, match="stopped after"):
        fetch(server.url("/w/plain.pkl"))
    assert [f for f in cache_files(home) if not f.endswith(".lock")] == []
    assert open(fetch(server.url(name)), "rb").read() == data  # a rerun succeeds


def test_killed_download_leaves_no_final_file_and_is_cleaned_up(server, home):
    data = state_bytes(8) * 50  # several chunks, so the temp file exists mid-transfer
    name = "/w/" + hashed_name(data)
    server.files[name] = data
    server.modes[name] = ["stall"]
    url = server.url(name)
    dest = hub.cache_path_for_url(url)
    code = "import sys; from engine.models.hub import fetch; fetch(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, url], cwd=ROOT,
                            env=dict(os.environ, MGE_HOME=str(home)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not temp_files(home) or server.gets[name] == 0:
            assert proc.poll() is None, "the fetching process exited early"
            assert time.monotonic() < deadline, "no temp file appeared"
            time.sleep(0.05)
        time.sleep(0.2)  # let it write the half it received
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not os.path.exists(dest)  # nothing a later run would trust
    assert temp_files(home)  # the killed process's partial file, hidden
    assert fetch(url) == dest and open(dest, "rb").read() == data
    assert temp_files(home) == []  # the next fetch removed it, under the lock


def _fetch_in_child(url, start_at, queue):
    while time.time() < start_at:  # both children enter fetch at the same moment
        time.sleep(0.001)
    try:
        queue.put(("ok", fetch(url)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", repr(exc)))


def test_concurrent_fetch_from_two_processes_downloads_once(server, home):
    data = state_bytes(9)
    name = "/w/" + hashed_name(data)
    server.files[name] = data
    server.modes[name] = ["delay", "delay"]  # a slow server: without the lock both would GET
    url = server.url(name)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_fetch_in_child, args=(url, start_at, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1] == hub.cache_path_for_url(url)
    assert open(results[0][1], "rb").read() == data
    assert server.gets[name] == 1


def test_unreachable_url_is_a_one_line_user_error(home):
    with pytest.raises(WeightsError) as exc:
        fetch("http://127.0.0.1:9/w/" + hashed_name(b"x"), timeout=2.0)
    msg = str(exc.value)
    assert "could not download" in msg and "\n" not in msg
    assert hub.cache_path_for_url("http://127.0.0.1:9/w/" + hashed_name(b"x")) in msg


# ------------------------------------------------------------------------------ prefetch_weights


def test_prefetch_weights(tmp_path, home, monkeypatch):
    assert prefetch_weights(None, "resnet50") is None  # nothing requested: nothing fetched
    local = tmp_path / "mine.pkl"
    local.write_bytes(state_bytes(10))
    assert prefetch_weights(str(local), "resnet18") == str(local)
    with pytest.raises(WeightsError, match="not found"):
        prefetch_weights(str(tmp_path / "missing.pkl"), "resnet18")
    with pytest.raises(WeightsError, match="no published"):
        prefetch_weights("published", "wide_resnet50_2")
    # published weights: already in the cache under a name whose hash matches -> no download
    monkeypatch.setattr(hub, "WEIGHTS_URL_BASE", "http://127.0.0.1:9/")
    data = state_bytes(11)
    monkeypatch.setitem(hub.PRETRAINED_FILES, "resnet18", hashed_name(data, "resnet18_x"))
    cached = hub.pretrained_cache_path("resnet18")
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(data)
    assert prefetch_weights("published", "resnet18") == cached
    assert fetch("resnet18") == cached


def test_prefetch_weights_downloads_published_from_the_base_url(server, home, monkeypatch):
    data = state_bytes(12)
    fname = hashed_name(data, "resnet34_x")
    server.files["/models/weights/" + fname] = data
    monkeypatch.setattr(hub, "WEIGHTS_URL_BASE", server.url("/models/weights/"))
    monkeypatch.setitem(hub.PRETRAINED_FILES, "resnet34", fname)
    path = prefetch_weights("published", "resnet34")
    # the cache name comes from the official URL, so megengine.hub finds the same file
    assert path == hub.cache_path_for_url(hub.OFFICIAL_URL_BASE + fname)
    assert open(path, "rb").read() == data and server.gets["/models/weights/" + fname] == 1


def test_inference_tool_reports_a_bad_download_in_one_line(server, home, tmp_path):
    name = "/w/" + hashed_name(b"the published bytes")
    server.files[name] = state_bytes(13)
    img = tmp_path / "cat.jpg"
    img.write_bytes(jpeg_bytes(photo_bgr("chelsea")))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inference.py"),
                        "-m", server.url(name), "-i", str(img)],
                       cwd=ROOT, env=dict(os.environ, MGE_HOME=str(home)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "sha256" in lines[0], r.stderr

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness

REPO = Path(__file__).resolve().parents[2]


def test_start_script_prints_tcti_and_is_idempotent(tmp_path):
    state = tmp_path / "tpm"
    try:
        out = subprocess.run([REPO / "swtpm" / "start", state], capture_output=True, text=True,
                             check=True, timeout=60).stdout.strip()
        assert out.startswith("swtpm:host=127.0.0.1,port=") and "\n" not in out
        again = subprocess.run([REPO / "swtpm" / "start", state], capture_output=True, text=True,
                               check=True, timeout=60).stdout.strip()
        assert again == out
        assert (state / "vendor-ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    finally:
        subprocess.run([REPO / "swtpm" / "stop", state], check=True, timeout=30)
    assert harness.running_tcti(state) is None


def test_parallel_starts_do_not_collide(tmp_path):
    dirs = [tmp_path / f"t{i}" for i in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            tctis = list(pool.map(harness.start, dirs))
        assert len(set(tctis)) == 4
        cas = {(d / "vendor-ca.pem").read_text() for d in dirs}
        assert len(cas) == 4  # a vendor CA per TPM
    finally:
        for d in dirs:
            harness.stop(d)


def test_demo_down_signals_only_the_demos_own_processes(tmp_path):
    import stack

    demo = tmp_path / "demo"
    (demo / "tpm").mkdir(parents=True)
    # A PID from the file that now belongs to something else (here: a sleep that is no
    # part of the demo), and a stale swtpm.pid: neither may be signalled.
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        (demo / "pids").write_text(f"{stranger.pid}\n")
        (demo / "tpm" / "swtpm.pid").write_text(f"{stranger.pid}\n")
        assert not harness.pid_runs(stranger.pid, str(demo))
        assert stack.down(demo) == 0
        assert stranger.poll() is None, "an unrelated process was signalled"
        assert not (demo / "pids").exists()
    finally:
        stranger.kill()
        stranger.wait()

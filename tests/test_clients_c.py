"""The C client (clients/c) against a real `mlipd serve`: the same results as the Python
client to the last bit (periodic, slab, open, triclinic), a batch, errors (NaN ->
bad_input, too_large before sending, a missing server within timeout_s), CURVE; the
installed library through pkg-config; the MD and batch examples (CHGNet)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

pytest.register_assert_rewrite("clients_support")  # before its import: shared assertions
from clients_support import (  # noqa: E402
    check_batch,
    check_curve,
    check_equals_python_client,
    check_heartbeat,
    check_md_example,
    check_missing_server,
    check_nan_is_bad_input,
    check_too_large_before_sending,
    python_results,
)

pytest_plugins = ("clients_support",)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def probe(clients):
    return clients.program("mlipd_probe_c")


def test_results_equal_the_python_clients_bit_for_bit(probe, reference_server, tmp_path):
    check_equals_python_client(probe, reference_server, tmp_path)


def test_batch_equals_python_batch_and_single_calls(probe, reference_server, tmp_path):
    check_batch(probe, reference_server, tmp_path)


def test_nan_coordinate_is_bad_input(probe, reference_server, tmp_path):
    check_nan_is_bad_input(probe, reference_server, tmp_path)


def test_oversized_request_is_too_large_before_sending(probe, reference_server, tmp_path):
    check_too_large_before_sending(probe, reference_server, tmp_path)


def test_missing_server_fails_within_timeout_naming_the_endpoint(probe, tmp_path):
    check_missing_server(probe, tmp_path)


def test_heartbeat_waits_for_a_slow_request_and_notices_a_dead_server(probe, tmp_path):
    check_heartbeat(probe, tmp_path)


def test_curve_with_an_authorised_and_an_unauthorised_key(probe, curve_server, tmp_path):
    check_curve(probe, curve_server, tmp_path)


PROGRAM = r"""
#include <mlipd_client.h>
#include <stdio.h>
int main(int argc, char **argv) {
    mlipd_client *c = mlipd_connect(argv[1], 30.0);
    if (!c) { printf("%s\n", mlipd_last_error()); return 1; }
    mlipd_server_info info;
    int rc = mlipd_info(c, &info);
    printf("%d %s %s %g %lld %d\n", rc, info.model, info.dtype, info.cutoff,
           info.max_request_atoms, mlipd_ping(c));
    mlipd_close(c);
    return rc;
}
"""


def test_installed_library_links_through_pkg_config(clients, reference_server, tmp_path):
    (tmp_path / "prog.c").write_text(PROGRAM)
    env = {"PKG_CONFIG_PATH": clients.pkg_config_path, "PATH": "/usr/bin:/bin"}
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "mlipd-client"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    libdir = next(f[2:] for f in flags if f.startswith("-L"))
    subprocess.run(["cc", "-o", str(tmp_path / "prog"), str(tmp_path / "prog.c"), *flags,
                    f"-Wl,-rpath,{libdir}"], check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(tmp_path / "prog"), reference_server.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["0", "reference", "float64", "5", "200", "0"]


THREADS = r"""
#include <mlipd_client.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
/* 4 threads, one client each, 10 computes of one argon pair per thread at once; and a
   fifth thread whose connect fails: its error text is its own */
static const char *endpoint;
static double energies[4];
static int status[4];
static char bad_error[512], good_error[512];
static void *work(void *arg) {
    int k = (int)(long)arg, numbers[2] = {18, 18};
    double x[6] = {0, 0, 0, 3.6 + 0.1 * k, 0, 0}, f[6];
    mlipd_client *c = mlipd_connect(endpoint, 30.0);
    if (!c) { status[k] = -100; return NULL; }
    for (int i = 0; i < 10 && status[k] == 0; i++)
        status[k] = mlipd_compute(c, 2, numbers, x, NULL, NULL, &energies[k], f, NULL);
    snprintf(good_error, sizeof good_error, "%s", mlipd_last_error());
    mlipd_close(c);
    return NULL;
}
static void *fail(void *arg) {
    (void)arg;
    if (mlipd_connect("no-scheme", 1.0) == NULL)
        snprintf(bad_error, sizeof bad_error, "%s", mlipd_last_error());
    return NULL;
}
int main(int argc, char **argv) {
    pthread_t t[5];
    endpoint = argv[1];
    for (long k = 0; k < 4; k++) pthread_create(&t[k], NULL, work, (void *)k);
    pthread_create(&t[4], NULL, fail, NULL);
    for (int k = 0; k < 5; k++) pthread_join(t[k], NULL);
    for (int k = 0; k < 4; k++) printf("%d %.17g\n", status[k], energies[k]);
    printf("bad: %s\ngood: [%s]\n", bad_error, good_error);
    return 0;
}
"""


def test_one_client_per_thread(clients, reference_server, tmp_path):
    from mlipd.engine import make_engine
    from mlipd.testing import tolerances as tol
    from mlipd.types import Structure

    (tmp_path / "threads.c").write_text(THREADS)
    env = {"PKG_CONFIG_PATH": clients.pkg_config_path, "PATH": "/usr/bin:/bin"}
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "mlipd-client"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    libdir = next(f[2:] for f in flags if f.startswith("-L"))
    subprocess.run(["cc", "-pthread", "-o", str(tmp_path / "threads"),
                    str(tmp_path / "threads.c"), *flags, f"-Wl,-rpath,{libdir}"],
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(tmp_path / "threads"), reference_server.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    pairs = [Structure(numbers=[18, 18], positions=[[0, 0, 0], [3.6 + 0.1 * k, 0, 0]],
                       cell=np.zeros((3, 3)), pbc=[False] * 3) for k in range(4)]
    want = python_results(reference_server.address, pairs)
    engine = make_engine("reference", dtype="float64")  # the server's model, for the bound
    for k in range(4):
        rc, energy = lines[k].split()
        assert rc == "0", lines
        # concurrent requests may share one engine call: two float64 computations
        # (``tol.float64``, a batch's product for the shifts); printed with 17 digits
        bound = tol.measured_float64(engine, pairs[k], want[k]).energy_per_atom * 2  # 2 atoms
        assert abs(float(energy) - want[k].energy) <= bound + tol.printed_half_unit(energy)
    assert lines[4].startswith("bad: setup: no-scheme: not a ZeroMQ endpoint"), lines
    assert lines[5] == "good: []", lines  # the failed connect's text stayed in its thread


def test_md_example_conserves_energy(clients, chgnet_server):
    check_md_example(clients.program("mlipd_md_c"), chgnet_server)


def test_batch_example_prints_one_row_per_volume(clients, chgnet_server):
    proc = subprocess.run([str(clients.program("mlipd_batch_c")), chgnet_server.address, "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines() if not ln.startswith("#")]
    assert len(rows) == 3
    volumes = [float(r[0]) for r in rows]
    assert volumes == sorted(volumes)
    # the middle point's pressures: from its virial and from the curve's slope, close
    # (a central difference over +-4% in lattice constant)
    p_virial, p_slope = float(rows[1][2]), float(rows[1][3])
    assert p_virial == pytest.approx(p_slope, abs=3.0)

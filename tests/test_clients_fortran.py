"""The Fortran module `mlipd` (clients/fortran) against a real `mlipd serve`: the same
results as the Python client to the last bit (periodic, slab, open, triclinic), a batch,
errors (NaN -> bad_input, too_large before sending, a missing server within timeout_s),
CURVE; the installed module through pkg-config; the MD example (CHGNet)."""

from __future__ import annotations

import subprocess

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
)

pytest_plugins = ("clients_support",)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def probe(clients):
    return clients.program("mlipd_probe_fortran")


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


PROGRAM = """
program prog
  use mlipd
  implicit none
  type(mlipd_client) :: c
  character(len=256) :: endpoint
  call get_command_argument(1, endpoint)
  if (mlipd_connect(c, trim(endpoint), 30d0) /= MLIPD_OK) then
    print '(a)', mlipd_error(c)
    stop 1
  end if
  print '(i0)', mlipd_ping(c)
  call mlipd_close(c)
  print '(l1)', mlipd_is_connected(c)
end program prog
"""


def test_installed_module_links_through_pkg_config(clients, reference_server, tmp_path):
    (tmp_path / "prog.f90").write_text(PROGRAM)
    env = {"PKG_CONFIG_PATH": clients.pkg_config_path, "PATH": "/usr/bin:/bin"}
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "mlipd-fortran"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    libdir = next(f[2:] for f in flags if f.startswith("-L"))
    subprocess.run(["gfortran", "-std=f2008", "-o", str(tmp_path / "prog"),
                    str(tmp_path / "prog.f90"), *flags, f"-Wl,-rpath,{libdir}"],
                   check=True, capture_output=True, timeout=120, cwd=tmp_path)
    out = subprocess.run([str(tmp_path / "prog"), reference_server.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["0", "F"]


def test_md_example_conserves_energy(clients, chgnet_server):
    check_md_example(clients.program("mlipd_md_fortran"), chgnet_server)

! module mlipd: the C client of `mlipd serve` (clients/c/mlipd_client.h) for Fortran 2008.
!
!   use mlipd
!   type(mlipd_client) :: client
!   ierr = mlipd_connect(client, "tcp://127.0.0.1:5555", 60d0)
!   if (ierr /= MLIPD_OK) print *, mlipd_error(client)
!   ierr = mlipd_compute(client, numbers, positions, energy, forces, cell=cell, virial=virial)
!   call mlipd_close(client)
!
! Arrays have Fortran's shapes: positions(3, n) and forces(3, n) (column j is atom j),
! cell(3, 3) with cell(:, i) the i-th lattice vector, virial(3, 3). In memory these are
! exactly the C library's row-major arrays, so nothing is copied or transposed. Units:
! Angstrom, eV, eV/Angstrom; the virial is -dE/dstrain in eV.
! Every function returns MLIPD_OK (0) or a negative MLIPD_E_* code; mlipd_error(client)
! then says why (code and text). One client per thread.
module mlipd
  use, intrinsic :: iso_c_binding, only: c_ptr, c_null_ptr, c_int, c_double, c_char, &
      c_null_char, c_associated, c_loc, c_f_pointer, c_size_t
  implicit none
  private

  integer, parameter, public :: MLIPD_OK = 0
  integer, parameter, public :: MLIPD_E_BAD_INPUT = -1
  integer, parameter, public :: MLIPD_E_TOO_LARGE = -2
  integer, parameter, public :: MLIPD_E_UNKNOWN_SPECIES = -3
  integer, parameter, public :: MLIPD_E_BUSY = -4
  integer, parameter, public :: MLIPD_E_TIMEOUT = -5
  integer, parameter, public :: MLIPD_E_CALCULATION = -6
  integer, parameter, public :: MLIPD_E_UNAVAILABLE = -7
  integer, parameter, public :: MLIPD_E_PROTOCOL = -8
  integer, parameter, public :: MLIPD_E_INTERNAL = -9
  integer, parameter, public :: MLIPD_E_SETUP = -10

  !> A connection to one server; mlipd_connect opens it, mlipd_close ends it.
  type, public :: mlipd_client
    type(c_ptr) :: handle = c_null_ptr
    character(len=:), allocatable :: connect_error  ! why mlipd_connect failed
  end type mlipd_client

  public :: mlipd_connect, mlipd_compute, mlipd_compute_batch, mlipd_ping, &
      mlipd_set_heartbeat, mlipd_error, mlipd_close, mlipd_is_connected

  interface
    type(c_ptr) function c_connect(endpoint, timeout_s) bind(C, name="mlipd_connect")
      import :: c_ptr, c_char, c_double
      character(kind=c_char), intent(in) :: endpoint(*)
      real(c_double), value :: timeout_s
    end function c_connect

    type(c_ptr) function c_connect_curve(endpoint, timeout_s, key_dir) &
        bind(C, name="mlipd_connect_curve")
      import :: c_ptr, c_char, c_double
      character(kind=c_char), intent(in) :: endpoint(*), key_dir(*)
      real(c_double), value :: timeout_s
    end function c_connect_curve

    integer(c_int) function c_compute_batch(client, n_structures, n_atoms, numbers, &
        positions, cells, pbc, energies, forces, virials) bind(C, name="mlipd_compute_batch")
      import :: c_ptr, c_int
      type(c_ptr), value :: client, n_atoms, numbers, positions, cells, pbc, energies, &
          forces, virials
      integer(c_int), value :: n_structures
    end function c_compute_batch

    integer(c_int) function c_ping(client) bind(C, name="mlipd_ping")
      import :: c_ptr, c_int
      type(c_ptr), value :: client
    end function c_ping

    integer(c_int) function c_set_heartbeat(client, heartbeat_s) &
        bind(C, name="mlipd_set_heartbeat")
      import :: c_ptr, c_int, c_double
      type(c_ptr), value :: client
      real(c_double), value :: heartbeat_s
    end function c_set_heartbeat

    type(c_ptr) function c_error(client) bind(C, name="mlipd_error")
      import :: c_ptr
      type(c_ptr), value :: client
    end function c_error

    type(c_ptr) function c_last_error() bind(C, name="mlipd_last_error")
      import :: c_ptr
    end function c_last_error

    integer(c_int) function c_last_error_code() bind(C, name="mlipd_last_error_code")
      import :: c_int
    end function c_last_error_code

    subroutine c_close(client) bind(C, name="mlipd_close")
      import :: c_ptr
      type(c_ptr), value :: client
    end subroutine c_close

    integer(c_size_t) function c_strlen(s) bind(C, name="strlen")
      import :: c_ptr, c_size_t
      type(c_ptr), value :: s
    end function c_strlen
  end interface

contains

  !> Connect and ask the server for `info` within timeout_s (which then bounds every call).
  !> key_dir: a directory of `mlipd keygen` for a server run with --curve.
  integer function mlipd_connect(client, endpoint, timeout_s, key_dir) result(ierr)
    type(mlipd_client), intent(inout) :: client
    character(len=*), intent(in) :: endpoint
    real(c_double), intent(in) :: timeout_s
    character(len=*), intent(in), optional :: key_dir

    call mlipd_close(client)
    if (present(key_dir)) then
      client%handle = c_connect_curve(to_c(endpoint), timeout_s, to_c(key_dir))
    else
      client%handle = c_connect(to_c(endpoint), timeout_s)
    end if
    if (c_associated(client%handle)) then
      ierr = MLIPD_OK
    else
      client%connect_error = from_c(c_last_error())
      ierr = c_last_error_code()
    end if
  end function mlipd_connect

  !> One structure: numbers(n), positions(3, n) Angstrom; cell(3, 3) (cell(:, i) the i-th
  !> lattice vector; absent: open boundaries), pbc(3) (absent: periodic with a cell);
  !> energy eV, forces(3, n) eV/Angstrom, virial(3, 3) eV (absent: not computed; NaN
  !> where the server has none, a cell not periodic in all three directions).
  integer function mlipd_compute(client, numbers, positions, energy, forces, cell, pbc, &
      virial) result(ierr)
    type(mlipd_client), intent(inout) :: client
    integer(c_int), intent(in), target, contiguous :: numbers(:)
    real(c_double), intent(in), target, contiguous :: positions(:, :)
    real(c_double), intent(out) :: energy
    real(c_double), intent(out), target, contiguous :: forces(:, :)
    real(c_double), intent(in), target, optional :: cell(3, 3)
    logical, intent(in), optional :: pbc(3)
    real(c_double), intent(out), target, optional :: virial(3, 3)
    real(c_double), target :: energies(1)
    integer(c_int), target :: counts(1), flags(3)
    type(c_ptr) :: cell_p, pbc_p, virial_p

    ierr = check_shapes(size(numbers), positions, forces)
    if (ierr /= MLIPD_OK) return
    counts(1) = int(size(numbers), c_int)
    cell_p = c_null_ptr
    pbc_p = c_null_ptr
    virial_p = c_null_ptr
    if (present(cell)) cell_p = c_loc(cell)
    if (present(pbc)) then
      flags = merge(1_c_int, 0_c_int, pbc)
      pbc_p = c_loc(flags)
    end if
    if (present(virial)) virial_p = c_loc(virial)
    ierr = c_compute_batch(client%handle, 1_c_int, c_loc(counts), c_loc(numbers), &
        c_loc(positions), cell_p, pbc_p, c_loc(energies), c_loc(forces), virial_p)
    energy = energies(1)
  end function mlipd_compute

  !> Several structures in one request: n_atoms(s) atoms each; numbers, positions(3, :)
  !> and forces(3, :) concatenated in structure order; cells(3, 3, s) (absent: all open),
  !> pbc(3, s) (absent: periodic with a cell); energies(s); virials(3, 3, s).
  integer function mlipd_compute_batch(client, n_atoms, numbers, positions, energies, &
      forces, cells, pbc, virials) result(ierr)
    type(mlipd_client), intent(inout) :: client
    integer(c_int), intent(in), target, contiguous :: n_atoms(:), numbers(:)
    real(c_double), intent(in), target, contiguous :: positions(:, :)
    real(c_double), intent(out), target, contiguous :: energies(:), forces(:, :)
    real(c_double), intent(in), target, optional, contiguous :: cells(:, :, :)
    logical, intent(in), optional :: pbc(:, :)
    real(c_double), intent(out), target, optional, contiguous :: virials(:, :, :)
    integer(c_int), allocatable, target :: flags(:, :)
    type(c_ptr) :: cells_p, pbc_p, virials_p
    integer :: ns

    ns = size(n_atoms)
    ierr = check_shapes(size(numbers), positions, forces)
    if (ierr /= MLIPD_OK) return
    if (sum(int(n_atoms, kind(ns))) /= size(numbers) .or. size(energies) /= ns) then
      ierr = MLIPD_E_BAD_INPUT
      return
    end if
    cells_p = c_null_ptr
    pbc_p = c_null_ptr
    virials_p = c_null_ptr
    if (present(cells)) then
      if (any(shape(cells) /= [3, 3, ns])) then
        ierr = MLIPD_E_BAD_INPUT
        return
      end if
      cells_p = c_loc(cells)
    end if
    if (present(pbc)) then
      if (any(shape(pbc) /= [3, ns])) then
        ierr = MLIPD_E_BAD_INPUT
        return
      end if
      flags = merge(1_c_int, 0_c_int, pbc)
      pbc_p = c_loc(flags)
    end if
    if (present(virials)) then
      if (any(shape(virials) /= [3, 3, ns])) then
        ierr = MLIPD_E_BAD_INPUT
        return
      end if
      virials_p = c_loc(virials)
    end if
    ierr = c_compute_batch(client%handle, int(ns, c_int), c_loc(n_atoms), c_loc(numbers), &
        c_loc(positions), cells_p, pbc_p, c_loc(energies), c_loc(forces), virials_p)
  end function mlipd_compute_batch

  integer function mlipd_ping(client) result(ierr)
    type(mlipd_client), intent(in) :: client
    ierr = c_ping(client%handle)
  end function mlipd_ping

  integer function mlipd_set_heartbeat(client, heartbeat_s) result(ierr)
    type(mlipd_client), intent(in) :: client
    real(c_double), intent(in) :: heartbeat_s
    ierr = c_set_heartbeat(client%handle, heartbeat_s)
  end function mlipd_set_heartbeat

  logical function mlipd_is_connected(client)
    type(mlipd_client), intent(in) :: client
    mlipd_is_connected = c_associated(client%handle)
  end function mlipd_is_connected

  !> The last error of this client ("code: text"), or why mlipd_connect failed.
  function mlipd_error(client) result(text)
    type(mlipd_client), intent(in) :: client
    character(len=:), allocatable :: text
    if (c_associated(client%handle)) then
      text = from_c(c_error(client%handle))
    else if (allocated(client%connect_error)) then
      text = client%connect_error
    else
      text = "setup: not connected"
    end if
  end function mlipd_error

  subroutine mlipd_close(client)
    type(mlipd_client), intent(inout) :: client
    if (c_associated(client%handle)) call c_close(client%handle)
    client%handle = c_null_ptr
  end subroutine mlipd_close

  ! ------------------------------------------------------------------ helpers

  integer function check_shapes(n, positions, forces) result(ierr)
    integer, intent(in) :: n
    real(c_double), intent(in) :: positions(:, :), forces(:, :)
    ierr = MLIPD_OK
    if (size(positions, 1) /= 3 .or. size(positions, 2) /= n .or. &
        size(forces, 1) /= 3 .or. size(forces, 2) /= n) ierr = MLIPD_E_BAD_INPUT
  end function check_shapes

  function to_c(s) result(out)
    character(len=*), intent(in) :: s
    character(kind=c_char) :: out(len_trim(s) + 1)
    integer :: i
    do i = 1, len_trim(s)
      out(i) = s(i:i)
    end do
    out(len_trim(s) + 1) = c_null_char
  end function to_c

  function from_c(p) result(s)
    type(c_ptr), intent(in) :: p
    character(len=:), allocatable :: s
    character(kind=c_char), pointer :: chars(:)
    integer :: i, n
    if (.not. c_associated(p)) then
      s = ""
      return
    end if
    n = int(c_strlen(p))
    call c_f_pointer(p, chars, [n])
    allocate (character(len=n) :: s)
    do i = 1, n
      s(i:i) = chars(i)
    end do
  end function from_c

end module mlipd

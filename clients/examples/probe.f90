! mlipd_probe_fortran: the Fortran twin of probe.c (the tests and `mlipd bench clients`
! drive both): structures from a file through the module `mlipd`, results to a file.
!
!   mlipd_probe_fortran ENDPOINT TIMEOUT_S MODE IN OUT [KEY_DIR]
!
! MODE single, batch or repeat:R; file formats, output lines, exit codes and the
! MLIPD_HEARTBEAT_S environment variable as probe.c.
program mlipd_probe
  use, intrinsic :: iso_c_binding, only: c_double, c_int
  use mlipd
  implicit none
  type(mlipd_client) :: client
  character(len=4096) :: endpoint, mode, in_path, out_path, key_dir, arg
  real(c_double) :: timeout_s, heartbeat_s
  integer(c_int) :: count, has
  integer(c_int), allocatable :: n(:), numbers(:), pbc_in(:, :), has_cell(:)
  real(c_double), allocatable :: positions(:, :), cells(:, :, :), energies(:), forces(:, :)
  real(c_double), allocatable :: virials(:, :, :)
  logical, allocatable :: pbc(:, :)
  integer :: u, s, first, last, ierr, repeats, r, colon
  integer(kind=8) :: t0, t1, rate

  if (command_argument_count() < 5) then
    print '(a)', "usage: mlipd_probe_fortran ENDPOINT TIMEOUT_S MODE IN OUT [KEY_DIR]"
    stop 2
  end if
  call get_command_argument(1, endpoint)
  call get_command_argument(2, arg)
  read (arg, *) timeout_s
  call get_command_argument(3, mode)
  call get_command_argument(4, in_path)
  call get_command_argument(5, out_path)

  ! the structures: read twice (sizes, then arrays) from a stream file
  open (newunit=u, file=trim(in_path), access="stream", form="unformatted", status="old")
  read (u) count
  allocate (n(count), has_cell(count), cells(3, 3, count), pbc_in(3, count))
  do s = 1, count
    read (u) n(s)
    allocate (numbers(n(s)), positions(3, n(s)))
    read (u) numbers, positions, has_cell(s), cells(:, :, s), pbc_in(:, s)
    deallocate (numbers, positions)
  end do
  allocate (numbers(sum(n)), positions(3, sum(n)), forces(3, sum(n)), energies(count), &
      virials(3, 3, count))
  rewind (u)
  read (u) count
  first = 1
  do s = 1, count
    last = first + n(s) - 1
    read (u) has, numbers(first:last), positions(:, first:last), has, cells(:, :, s), &
        pbc_in(:, s)
    first = last + 1
  end do
  close (u)
  pbc = pbc_in /= 0

  if (command_argument_count() >= 6) then
    call get_command_argument(6, key_dir)
    ierr = mlipd_connect(client, trim(endpoint), timeout_s, key_dir=trim(key_dir))
  else
    ierr = mlipd_connect(client, trim(endpoint), timeout_s)
  end if
  if (ierr /= MLIPD_OK) then
    print '(a, i0, 2a)', "connect ", ierr, " ", mlipd_error(client)
    stop 2
  end if

  call get_environment_variable("MLIPD_HEARTBEAT_S", arg, status=r)
  if (r == 0) then
    read (arg, *) heartbeat_s
    ierr = mlipd_set_heartbeat(client, heartbeat_s)
    if (ierr /= MLIPD_OK) then
      print '(a, i0, 2a)', "error ", ierr, " ", mlipd_error(client)
      stop 1
    end if
  end if

  if (trim(mode) == "batch") then
    ierr = mlipd_compute_batch(client, n, numbers, positions, energies, forces, cells=cells, &
        pbc=pbc, virials=virials)
  else
    repeats = 1
    colon = index(mode, ":")
    if (colon > 0) read (mode(colon + 1:), *) repeats
    first = 1
    ierr = MLIPD_OK
    do s = 1, count
      last = first + n(s) - 1
      call system_clock(t0, rate)
      do r = 1, repeats
        if (repeats > 1) positions(1, first) = positions(1, first) &
            + merge(-1d-6, 1d-6, mod(r - 1, 2) == 1)  ! a new structure every call
        if (has_cell(s) /= 0) then
          ierr = mlipd_compute(client, numbers(first:last), positions(:, first:last), &
              energies(s), forces(:, first:last), cell=cells(:, :, s), pbc=pbc(:, s), &
              virial=virials(:, :, s))
        else
          ierr = mlipd_compute(client, numbers(first:last), positions(:, first:last), &
              energies(s), forces(:, first:last), pbc=pbc(:, s), virial=virials(:, :, s))
        end if
        if (ierr /= MLIPD_OK) exit
      end do
      call system_clock(t1)
      if (repeats > 1) print '(a, f0.9)', "seconds ", real(t1 - t0, c_double) / rate / repeats
      if (ierr /= MLIPD_OK) exit
      first = last + 1
    end do
  end if
  if (ierr /= MLIPD_OK) then
    print '(a, i0, 2a)', "error ", ierr, " ", mlipd_error(client)
    call mlipd_close(client)
    stop 1
  end if

  open (newunit=u, file=trim(out_path), access="stream", form="unformatted", &
      status="replace")
  first = 1
  do s = 1, count
    last = first + n(s) - 1
    write (u) energies(s), forces(:, first:last), virials(:, :, s)
    first = last + 1
  end do
  close (u)
  print '(a)', "ok"
  call mlipd_close(client)
end program mlipd_probe

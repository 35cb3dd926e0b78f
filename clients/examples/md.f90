! mlipd_md_fortran: velocity-Verlet NVE molecular dynamics of diamond silicon (64 atoms),
! forces from a running `mlipd serve` through the Fortran module `mlipd`. Prints the
! energies of every step and how well the total energy is conserved.
!
!   mlipd serve --model chgnet --zmq tcp://127.0.0.1:5555 &
!   mlipd_md_fortran tcp://127.0.0.1:5555 [STEPS=20] [DT_FS=1.0] [T_K=300]
!
! Units: Angstrom, eV, fs, amu. The same run in C: md.c.
program mlipd_md
  use, intrinsic :: iso_c_binding, only: c_double, c_int
  use mlipd
  implicit none
  integer, parameter :: n = 64
  real(c_double), parameter :: mass = 28.0855d0, a_si = 5.431d0, kb = 8.617333262d-5
  real(c_double), parameter :: accel = 9.64853321d-3, ekin_unit = 103.6426965d0
  real(c_double), parameter :: pi = 3.14159265358979324d0
  real(c_double), parameter :: basis(3, 8) = reshape([0d0, 0d0, 0d0, 0d0, .5d0, .5d0, &
      .5d0, 0d0, .5d0, .5d0, .5d0, 0d0, .25d0, .25d0, .25d0, .25d0, .75d0, .75d0, &
      .75d0, .25d0, .75d0, .75d0, .75d0, .25d0], [3, 8])
  type(mlipd_client) :: client
  integer(c_int) :: numbers(n)
  real(c_double) :: x(3, n), v(3, n), f(3, n), cell(3, 3), virial(3, 3), u(3, n, 2)
  real(c_double) :: energy, e0, ek, worst, dt, temperature, sigma, p
  integer :: steps, step, ia, ib, ic, k, i, ierr, seed_size
  integer, allocatable :: seed(:)
  character(len=512) :: endpoint, arg

  if (command_argument_count() < 1) then
    print '(a)', "usage: mlipd_md_fortran ENDPOINT [STEPS] [DT_FS] [T_K]"
    stop 2
  end if
  call get_command_argument(1, endpoint)
  steps = 20
  dt = 1d0
  temperature = 300d0
  if (command_argument_count() >= 2) then
    call get_command_argument(2, arg)
    read (arg, *) steps
  end if
  if (command_argument_count() >= 3) then
    call get_command_argument(3, arg)
    read (arg, *) dt
  end if
  if (command_argument_count() >= 4) then
    call get_command_argument(4, arg)
    read (arg, *) temperature
  end if

  i = 0
  do ia = 0, 1
    do ib = 0, 1
      do ic = 0, 1
        do k = 1, 8
          i = i + 1
          numbers(i) = 14
          x(:, i) = ([real(c_double) :: ia, ib, ic] + basis(:, k)) * a_si
        end do
      end do
    end do
  end do
  cell = 0
  do k = 1, 3
    cell(k, k) = 2 * a_si  ! cell(:, k): the k-th lattice vector
  end do

  ! Maxwell-Boltzmann at 2T (half goes into potential energy), no net momentum
  call random_seed(size=seed_size)
  allocate (seed(seed_size))
  seed = 12345
  call random_seed(put=seed)
  call random_number(u)
  sigma = sqrt(kb * 2 * temperature / (mass * ekin_unit))
  v = sigma * sqrt(-2d0 * log(1d0 - u(:, :, 1))) * cos(2d0 * pi * u(:, :, 2))
  do k = 1, 3
    v(k, :) = v(k, :) - sum(v(k, :)) / n
  end do

  ierr = mlipd_connect(client, trim(endpoint), 600d0)
  if (ierr /= MLIPD_OK) then
    print '(a)', mlipd_error(client)
    stop 1
  end if
  ierr = mlipd_compute(client, numbers, x, energy, f, cell=cell, virial=virial)
  if (ierr /= MLIPD_OK) then
    print '(a)', mlipd_error(client)
    stop 1
  end if
  e0 = energy + kinetic(v)
  worst = 0
  print '(a)', "# step   E_pot (eV)        E_kin (eV)     E_tot (eV)         pressure (GPa)"
  do step = 0, steps
    if (step > 0) then
      v = v + 0.5d0 * dt * f / mass * accel
      x = x + dt * v
      ierr = mlipd_compute(client, numbers, x, energy, f, cell=cell, virial=virial)
      if (ierr /= MLIPD_OK) then
        print '(a, i0, 2a)', "step ", step, ": ", mlipd_error(client)
        call mlipd_close(client)
        stop 1
      end if
      v = v + 0.5d0 * dt * f / mass * accel
    end if
    ek = kinetic(v)
    p = (2 * ek + virial(1, 1) + virial(2, 2) + virial(3, 3)) / (3 * 8 * a_si**3) * 160.21766d0
    worst = max(worst, abs(energy + ek - e0))
    print '(i6, f17.8, f15.8, f17.8, f13.4)', step, energy, ek, energy + ek, p
  end do
  print '(a, es10.3, a)', "max |E_tot - E_tot(0)| per atom: ", worst / n, " eV"
  call mlipd_close(client)

contains

  real(c_double) function kinetic(vel)
    real(c_double), intent(in) :: vel(:, :)
    kinetic = 0.5d0 * mass * sum(vel**2) * ekin_unit
  end function kinetic
end program mlipd_md

# Runs cluster_mpi_dead_rank under mpirun and requires "rank R: PASS" from every survivor
# R < NP - 1. mpirun's exit status is not used: with --enable-recovery it is 0 even though
# a rank was killed, and a survivor that printed nothing must still fail the test.
# -D MPIEXEC= EXE= NP= MODE=(kill|hang) [MPI_FLAGS=]
separate_arguments(flags UNIX_COMMAND "${MPI_FLAGS}")
set(args)
if(MODE STREQUAL "hang")
  set(args --hang)
endif()
execute_process(COMMAND ${MPIEXEC} --oversubscribe ${flags} -np ${NP} ${EXE} ${args}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 40)
message(STATUS "mpirun exit: ${rc}\n${out}${err}")
if(rc MATCHES "timeout")
  message(FATAL_ERROR "survivors hung: mpirun still running after 40 s")
endif()
math(EXPR last "${NP} - 2")
math(EXPR dead "${NP} - 1")
foreach(r RANGE 0 ${last})
  if(NOT out MATCHES "rank ${r}: PASS")
    message(FATAL_ERROR "rank ${r} did not report the error naming rank ${dead} in time")
  endif()
endforeach()
if(out MATCHES "FAIL")
  message(FATAL_ERROR "a rank reported FAIL")
endif()

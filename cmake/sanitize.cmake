# UNS_SANITIZE: every target compiled and linked with AddressSanitizer and
# UndefinedBehaviorSanitizer (gcc or clang). Any UB report aborts the process
# (-fno-sanitize-recover), so a test or a live-test log cannot pass over it. CPU code only:
# nvcc takes no -fsanitize, and the CUDA runtime's allocations are not ASan's business.
# tests/sanitize/run_service_sanitized.sh builds this configuration and runs the service
# suites (real coordinator and worker processes under mpirun) with it.
if(UNS_HAVE_CUDA)
  message(FATAL_ERROR "UNS_SANITIZE: configure with -DUNS_ENABLE_CUDA=OFF -DUNS_ENABLE_NCCL=OFF (CPU code only)")
endif()
set(_uns_sanitize_flags -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_uns_sanitize_flags}>")
add_link_options(${_uns_sanitize_flags})
message(STATUS "unshackle: SANITIZE ON (ASan, UBSan)")

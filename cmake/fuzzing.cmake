# The fuzzing configuration (UNS_BUILD_FUZZERS): clang only, in a build directory of its own
# (tests/fuzz/run_fuzzers.sh). Everything compiled here gets libFuzzer's coverage
# instrumentation, AddressSanitizer and UndefinedBehaviorSanitizer (any UB aborts, so the
# fuzzer keeps the input), and libstdc++'s checked operator[]; assertions stay on (no
# NDEBUG: nlohmann's and Beast's asserts catch misuse). The fuzzers add libFuzzer's main.
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  message(FATAL_ERROR "UNS_BUILD_FUZZERS needs clang (libFuzzer), not ${CMAKE_CXX_COMPILER_ID}: "
                      "-DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14")
endif()
if(UNS_HAVE_CUDA)
  message(FATAL_ERROR "UNS_BUILD_FUZZERS: configure with -DUNS_ENABLE_CUDA=OFF (the fuzzers are CPU code)")
endif()
set(_uns_sanitize -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
add_compile_options(-fsanitize=fuzzer-no-link ${_uns_sanitize} -D_GLIBCXX_ASSERTIONS -UNDEBUG)
add_link_options(${_uns_sanitize})
message(STATUS "unshackle: FUZZERS ON (libFuzzer, ASan, UBSan)")

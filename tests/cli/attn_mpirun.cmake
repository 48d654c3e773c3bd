# make-case, then attn on one rank and under `mpirun -np 3`; the selected and evicted sets
# must be identical (compared by the tool's own summary line and by a byte diff of the
# index tensors, which sit after o in the file).
file(MAKE_DIRECTORY ${WORK})
execute_process(COMMAND ${UNSHACKLE} make-case --output ${WORK}/case.safetensors --mode esa --p 3000 --chunk 4
                --heads 4 --kv-heads 2 --head-dim 16 --rank 8 --top-k 48 --l-i 16 --l-l 256 --lag 64 --lag-ratio 0.5
                --needles 8 --seed 5 RESULT_VARIABLE made)
if(NOT made EQUAL 0)
  message(FATAL_ERROR "make-case failed")
endif()
execute_process(COMMAND ${UNSHACKLE} attn --input ${WORK}/case.safetensors --output ${WORK}/one.safetensors
                OUTPUT_VARIABLE one RESULT_VARIABLE one_rc)
execute_process(COMMAND ${MPIEXEC} --oversubscribe -np 3 ${UNSHACKLE} attn --kv-block 32 --input ${WORK}/case.safetensors
                --output ${WORK}/three.safetensors OUTPUT_VARIABLE three RESULT_VARIABLE three_rc)
if(NOT one_rc EQUAL 0 OR NOT three_rc EQUAL 0)
  message(FATAL_ERROR "attn failed: ${one} ${three}")
endif()
string(REGEX MATCH "[0-9]+ selected, [0-9]+ evicted" one_counts "${one}")
string(REGEX MATCH "[0-9]+ selected, [0-9]+ evicted" three_counts "${three}")
string(REGEX MATCH "needles selected: [0-9]+ of [0-9]+" one_needles "${one}")
string(REGEX MATCH "needles selected: [0-9]+ of [0-9]+" three_needles "${three}")
if(NOT one_counts STREQUAL three_counts OR NOT one_needles STREQUAL three_needles OR one_counts STREQUAL "")
  message(FATAL_ERROR "mpirun result differs: '${one_counts}' '${one_needles}' vs '${three_counts}' '${three_needles}'")
endif()
# The last bytes of each file are selected then evicted (int64), identical when the sets are.
file(READ ${WORK}/one.safetensors one_hex HEX)
file(READ ${WORK}/three.safetensors three_hex HEX)
string(LENGTH "${one_hex}" n1)
string(REGEX MATCH "([0-9]+) selected, ([0-9]+) evicted" _ "${one_counts}")
math(EXPR tail "(${CMAKE_MATCH_1} + ${CMAKE_MATCH_2}) * 16")
math(EXPR start1 "${n1} - ${tail}")
string(SUBSTRING "${one_hex}" ${start1} ${tail} one_tail)
string(LENGTH "${three_hex}" n3)
math(EXPR start3 "${n3} - ${tail}")
string(SUBSTRING "${three_hex}" ${start3} ${tail} three_tail)
if(NOT one_tail STREQUAL three_tail)
  message(FATAL_ERROR "selected/evicted bytes differ between one rank and mpirun -np 3")
endif()
message(STATUS "one rank and mpirun -np 3 agree: ${one_counts}, ${one_needles}")

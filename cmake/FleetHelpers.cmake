# Helpers that give every module and test the same shape:
#   fleet_add_library(<module> SOURCES ... [PUBLIC_LIBS ...] [PRIVATE_LIBS ...])
#     -> target fleet_<module>, ALIAS fleet::<module>, include/ PUBLIC, src/ PRIVATE.
#   fleet_add_executable(<name> SOURCES ... LIBS ...)
#   fleet_add_test(<name> SOURCES ... LIBS ... [LABELS ...] [ENVIRONMENT ...] [TIMEOUT s])
#     -> one GoogleTest binary, discovered at test time (libtorch binaries take ~1 s to start).

set(FLEET_WARNINGS -Wall -Wextra -Werror)

function(fleet_target_defaults target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${FLEET_WARNINGS}>)
endfunction()

function(fleet_add_library module)
  cmake_parse_arguments(ARG "" "" "SOURCES;PUBLIC_LIBS;PRIVATE_LIBS" ${ARGN})
  set(target fleet_${module})
  if(ARG_SOURCES)
    add_library(${target} STATIC ${ARG_SOURCES})
    target_include_directories(${target}
      PUBLIC $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>
      PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
    target_link_libraries(${target} PUBLIC ${ARG_PUBLIC_LIBS} PRIVATE ${ARG_PRIVATE_LIBS})
    fleet_target_defaults(${target})
  else()
    add_library(${target} INTERFACE)
    target_include_directories(${target} INTERFACE $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>)
    target_link_libraries(${target} INTERFACE ${ARG_PUBLIC_LIBS})
  endif()
  add_library(fleet::${module} ALIAS ${target})
endfunction()

function(fleet_add_executable name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS})
  fleet_target_defaults(${name})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
endfunction()

function(fleet_add_test name)
  if(NOT FLEET_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;LIBS;LABELS;ENVIRONMENT" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gmock GTest::gtest_main)
  fleet_target_defaults(${name})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  # Every test finds the built binaries through FLEET_BUILD_DIR (environment; the processes it
  # starts inherit it) and the source tree through FLEET_SOURCE_DIR_DEFAULT (compiled in).
  # gtest_discover_tests keeps only the first entry of a list-valued ENVIRONMENT, so extra
  # variables (ENVIRONMENT argument) replace FLEET_BUILD_DIR: give at most one.
  target_compile_definitions(${name} PRIVATE FLEET_SOURCE_DIR_DEFAULT="${CMAKE_SOURCE_DIR}"
                                             FLEET_BUILD_DIR_DEFAULT="${CMAKE_BINARY_DIR}")
  set(env "FLEET_BUILD_DIR=${CMAKE_BINARY_DIR}")
  if(ARG_ENVIRONMENT)
    set(env "${ARG_ENVIRONMENT}")
  endif()
  gtest_discover_tests(${name}
    DISCOVERY_MODE PRE_TEST
    DISCOVERY_TIMEOUT 60
    PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT} ENVIRONMENT "${env}")
endfunction()

// Registration hooks for each op family; bindings.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

void register_packed_seq_ops(pybind11::module_& m);  // packed_seq.cpp
void register_moe_ops(pybind11::module_& m);         // moe_routing.cpp
void register_dataset_ops(pybind11::module_& m);     // dataset_helpers.cpp

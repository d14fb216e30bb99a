"""One module per op: reference, validation, public function, autograd, registry entries."""

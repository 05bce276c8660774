"""Communication: dense-gradient all-reduce (flat or hierarchical, fp32/bf16/int8 with error
feedback), row quantisation for the embedding all-to-all, and HLO wire accounting."""

"""What `infer bench` and `infer eval` measure: throughput on random weights at real shapes, one attention layer
against torch SDPA and FlexAttention, and the answer quality of sparse against dense attention. Not the runtime."""

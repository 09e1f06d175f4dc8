"""One module per weight source: each turns its request into what to copy (a read plan, matched tensors,
received buckets) or a refusal (HotswapError naming what is wrong). Applying is `weights.apply`'s job,
sessions are `weights.session`'s."""

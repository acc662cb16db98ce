"""fairscale's model-parallel linear layers, as the model uses them: on several ranks they split the work as
Meta's shards split the weights; on a single rank their copy, gather and reduce steps are identities, yet each
is a Python autograd call, so there the plain product runs instead (about 20 microseconds per call, several
percent of a small model's decoding step)."""

import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fairscale_layers
from torch import Tensor


class ColumnParallelLinear(fairscale_layers.ColumnParallelLinear):
    """fairscale's column-parallel linear layer: each rank computes some of the output features."""

    def forward(self, x: Tensor) -> Tensor:
        if self.output_size_per_partition == self.out_features:  # one rank holds every output feature
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)


class RowParallelLinear(fairscale_layers.RowParallelLinear):
    """fairscale's row-parallel linear layer: each rank reads some input features, and the ranks' products are
    summed."""

    def forward(self, x: Tensor) -> Tensor:
        if self.input_size_per_partition == self.in_features:  # one rank: nothing to sum
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)

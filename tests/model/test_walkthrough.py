import torch

from tinygpt import walkthrough


def test_three_averages_agree():
    x = torch.randn(3, 11, 5, dtype=torch.float64)
    loop = walkthrough.average_with_loop(x)
    torch.testing.assert_close(walkthrough.average_with_matmul(x), loop)
    torch.testing.assert_close(walkthrough.average_with_softmax(x), loop)
    torch.testing.assert_close(loop[:, 4], x[:, :5].mean(dim=1))


def test_single_head_is_causal():
    x = torch.randn(2, 9, 16)
    out = walkthrough.single_head(x, head_size=8)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(walkthrough.single_head(x2, head_size=8)[:, :6], out[:, :6])
    assert out.shape == (2, 9, 8)

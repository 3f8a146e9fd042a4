import pytest
import torch

from runtime_backdoor.targets import make_target, solid_colour


def flat(r, g, b, size=4):
    return torch.tensor([r, g, b]).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


@pytest.mark.parametrize(
    "mean, expected",
    [
        ((0.5, 0.5, 0.5), "green"),  # all three tie: official order picks green first
        ((0.9, 0.1, 0.9), "green"),  # magenta image: green is farthest
        ((0.1, 0.9, 0.1), "red"),  # green image: red and blue tie, red first
        ((0.9, 0.9, 0.1), "blue"),  # yellow image: blue is farthest
        ((0.1, 0.9, 0.2), "red"),  # greenish image with a little blue: red beats blue
        # Means 127.48 / 127.70 / 127.79 truncate to a three-way tie (official: astype(int)),
        # where the untruncated means would pick red.
        ((127.48 / 255, 127.70 / 255, 127.79 / 255), "green"),
        # A whole 8-bit mean must not truncate to the value below (126 would make red win).
        ((127 / 255, 127 / 255, 127 / 255), "green"),
    ],
)
def test_solid_colour_rule(mean, expected):
    _, names = solid_colour(flat(*mean))
    assert names == [expected]


def test_solid_target_is_a_flat_image_of_the_colour():
    image = torch.cat([flat(0.9, 0.9, 0.1), flat(0.5, 0.5, 0.5)])
    t = make_target(image, "solid")
    assert t.shape == image.shape
    assert torch.equal(t[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(t[1, :, 2, 3], torch.tensor([0.0, 1.0, 0.0]))


def test_anti_target_inverts_the_image():
    image = torch.rand(2, 3, 5, 5)
    assert torch.allclose(make_target(image, "anti"), 1 - image)


def test_user_target_image_is_broadcast_and_checked():
    image = torch.rand(2, 3, 5, 5)
    user = torch.rand(3, 5, 5)
    assert torch.equal(make_target(image, user)[1], user)
    with pytest.raises(ValueError, match="does not match"):
        make_target(image, torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="unknown target"):
        make_target(image, "purple")

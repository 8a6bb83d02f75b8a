"""Random123's known-answer vectors for Philox4x32-10 (its kat_vectors file), shared by the
torch and the Triton Philox tests."""

import torch

KNOWN_ANSWERS = [
    # counter words, key words -> output words (Random123 kat_vectors, philox4x32_10)
    (("0", "0", "0", "0"), ("0", "0"), ("6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8")),
    (("ffffffff",) * 4, ("ffffffff", "ffffffff"), ("408f276d", "41c83b0e", "a20bc7c6", "6d5451fd")),
    (
        ("243f6a88", "85a308d3", "13198a2e", "03707344"),
        ("a4093822", "299f31d0"),
        ("d16cfe09", "94fdcceb", "5001e420", "24126ea1"),
    ),
]


def words(hex_words, device="cpu") -> torch.Tensor:
    """Hex 32-bit words -> an int64 tensor."""
    return torch.tensor([int(w, 16) for w in hex_words], dtype=torch.int64, device=device)

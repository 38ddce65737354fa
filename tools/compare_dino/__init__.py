"""Numerical comparison with the official DINO (IDEA-Research/DINO), imported at run time from the user's checkout.

``official``: builds the official DINO model, criterion and post-processor on CPU from a temporary, patched copy
of the checkout (nothing vendored, the checkout is not modified), randomises every parameter and buffer and
returns every intermediate a comparison needs. Run ``python -m tools.compare_dino --help``.
"""

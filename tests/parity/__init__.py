"""Our side of the parity checks against torchvision and detectron2: the constants, config
overrides, ``check`` and ``passes`` that the tests and the scripts in tests/scripts share.

The scripts in tests/scripts write the references (torch, torchvision and detectron2, in their
own virtual environment) and run these checks from the command line; the tests run them on the
committed small references. These modules need TensorFlow and numpy only, never torch.
"""

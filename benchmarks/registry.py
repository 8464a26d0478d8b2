"""The methods, in the lecture's order: the one list every benchmark reads.

    python benchmarks/registry.py          # print them

A method is its script, `<name>.py` at the top of the repository, run by its
command line (compare.py: a subprocess) or by its main(argv), which takes the
same arguments (claims.py, efficiency.py).
"""
import argparse

IMAGE_METHODS = ("rotation", "patch_location", "jigsaw", "inpainting", "colorization", "split_brain", "simclr",
                 "moco")  # evaluated with kNN and the linear probe on images
METHODS = IMAGE_METHODS[:6] + ("video_colorization",) + IMAGE_METHODS[6:]  # lecture order; videos scored by J

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(" ".join(METHODS))

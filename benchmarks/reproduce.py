"""The paper's experiments against retraining from scratch: see lightning_sa_unlearn/benchmarks.py.

python benchmarks/reproduce.py --setting mnist_targeted --seeds 0 1 2 3 4
"""

from lightning_sa_unlearn.benchmarks import main

if __name__ == "__main__":
    main()

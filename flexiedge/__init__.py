"""flexiedge: FlexiGPT pruning with low-rank weight sharing, exported for laptops and phones.

Data flows one way: load -> score -> select -> build -> recover -> export -> profile -> package.
"""

__version__ = "0.1.0"

"""Differential privacy bookkeeping: the accountant and the site's ledger.

No torch training here and nothing of Flower: the trainer (`fedgan.train`)
spends, this package counts.
"""

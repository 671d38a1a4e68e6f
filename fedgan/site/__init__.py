"""Everything that runs at a hospital: the ClientApp and what it calls.

Never imports `fedgan.aggregator`: the two sides share only `fedgan.wire`
(the message layout) and `fedgan.config` (the round contract)."""

from fedgan import timeline

# The first FedGAN code a ClientApp process runs: `bench/round_overhead.py`
# tells Flower's part of its start (interpreter, Flower, the app bundle, the
# message) from ours by this mark (a no-op unless FEDGAN_TIMELINE is set).
if timeline.enabled():
    timeline.mark("clientapp.loading", started=timeline.process_started())

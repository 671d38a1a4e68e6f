"""Everything that runs at a hospital: the ClientApp and what it calls.

Never imports `fedgan.aggregator`: the two sides share only `fedgan.wire`
(the message layout) and `fedgan.config` (the round contract)."""

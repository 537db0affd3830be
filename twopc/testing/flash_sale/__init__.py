"""``twopc flash-sale``: one hot item sold to many buyers across two regions, four ways.

The item's stock row lives in the first region, the buyers' wallets and their orders in the
second. The same sale runs, on the same data reset between runs, as:

- ``2pc-pessimistic``: a twopc transaction locks the stock row (``SELECT ... FOR UPDATE``),
  takes a unit, debits the wallet and writes the order;
- ``2pc-optimistic``: the stock row's version read without a lock and checked by the UPDATE;
  a conflict is rolled back and tried again (bounded);
- ``gate-2pc``: a Redis stock gate (an atomic decrement in a Lua script) admits only buyers who
  can still get a unit; they run the pessimistic transaction; a transaction that does not commit
  gives its unit back. The database stays the truth: a Redis restart mid-sale (the runner does
  one) empties the gate, which is re-seeded from the database;
- ``mq-outbox``: no distributed transaction. The stock region commits the unit and a row of
  twopc's outbox table locally; twopc's relay (``participants.relay``) publishes committed rows
  to RabbitMQ with publisher confirms; a consumer in the wallet region applies each order once
  (``twopc.outbox.first_delivery``: an inbox row keyed by the message id).

Modules: ``shop`` (schema, reset, the facts read back), ``gate`` (the Redis gate), ``outbox``
(the consumer), ``modes`` (a buyer's attempt in each mode), ``machine`` (TIME_WAIT, CPU per
process), ``runner`` (the command), ``plot`` (its picture).
"""

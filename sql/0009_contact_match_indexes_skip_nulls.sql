-- The indexes that identifying a contact probes (lower(username), lower(email), phone) held an
-- entry for every contact, NULL or not: a contact made from a PSID's first message has none of
-- the three, so each first message wrote three index entries no probe can ever find. Their
-- predicates now leave NULLs out too. The probes still use them: an equality on lower(x) or x
-- implies x IS NOT NULL (PostgreSQL proves it from the operator and lower() being strict),
-- which tests/test_conversations.py checks with EXPLAIN. The indexes are rebuilt under a lock
-- that holds back writes to contacts (migrations run in a transaction, so not CONCURRENTLY): on
-- a large contacts table, run it when first messages can wait that long.
DROP INDEX contacts_username_idx;
DROP INDEX contacts_email_idx;
DROP INDEX contacts_phone_idx;
CREATE INDEX contacts_username_idx ON contacts (lower(username))
    WHERE merged_into IS NULL AND username IS NOT NULL;
CREATE INDEX contacts_email_idx ON contacts (lower(email))
    WHERE merged_into IS NULL AND email IS NOT NULL;
CREATE INDEX contacts_phone_idx ON contacts (phone)
    WHERE merged_into IS NULL AND phone IS NOT NULL;

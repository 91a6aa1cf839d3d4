-- Images a vision chat model read in a request, priced per image beside its tokens.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS input_images UInt64 DEFAULT 0;

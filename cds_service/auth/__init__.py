"""Who may call: CDS Hooks client JWTs checked against allowlisted issuers and their keys, and replay refusal."""

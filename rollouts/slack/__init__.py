"""Slack: approval requests with buttons, alerts, `/rollout` commands, and linking Slack users to accounts.

Entry points: `views` (POST /slack/interactions, POST /slack/commands, /account/slack), `services`
(every write), `tasks` (posting and updating messages), `connect` (called from RolloutsConfig.ready)."""

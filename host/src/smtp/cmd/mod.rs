//! SMTP verbs, one group per file, each the same shape: check the state, check arguments and
//! policy, change the state, produce the reply.

mod auth;
mod data;
mod hello;
mod info;
mod mail;
mod rcpt;
mod starttls;

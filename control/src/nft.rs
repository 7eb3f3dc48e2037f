//! meshnet's own nftables tables, as typed nftables JSON (the `nftables`
//! crate) applied through `nft -j -f -`, one transaction per batch.
//!
//! Owns: the building blocks both users share — a table (family `ip`, or
//! `ip6` for [`crate::expose`]'s IPv6 half) declared-then-deleted-then-defined (so a batch replaces it whole, whether or
//! not it was there), base chains, rules with counters and comments — and
//! running `nft`. Users: [`crate::expose`] (tables `ip meshnet[-<bridge>]` and
//! `ip6 meshnet[-<bridge>]`: exposed subnets) and [`crate::trusted`] (table `meshnet-trusted-<bridge>`: who may
//! send to the kernel VXLAN port).
//!
//! Never touches another table (iptables-legacy, iptables-nft, Docker and
//! kube-proxy keep theirs) and never flushes the ruleset. The `nft` binary (the
//! nftables package) must be installed: the crate drives it.

use anyhow::Result;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem};
use nftables::helper::{self, NftablesError};
use nftables::schema::{Chain, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use meshnet_proto::ipam::Cidr;

/// nft's `priority filter`.
pub const PRIO_FILTER: i32 = 0;
/// nft's `priority srcnat`.
pub const PRIO_SRCNAT: i32 = 100;

/// A batch that starts by declaring and deleting `table` (family `ip`): what
/// follows defines it afresh; alone, it deletes it whether or not it is there.
pub fn declare_and_delete(table: &str) -> Batch<'static> {
    let mut batch = Batch::new();
    declare_and_delete_in(&mut batch, NfFamily::IP, table);
    batch
}

/// Adds the declaration and deletion of `family table` to `batch`.
pub fn declare_and_delete_in(batch: &mut Batch<'static>, family: NfFamily, table: &str) {
    batch.add(NfListObject::Table(our_table_in(family, table)));
    batch.delete(NfListObject::Table(our_table_in(family, table)));
}

pub fn our_table(table: &str) -> Table<'static> {
    our_table_in(NfFamily::IP, table)
}

pub fn our_table_in(family: NfFamily, table: &str) -> Table<'static> {
    Table { family, name: table.to_string().into(), handle: None }
}

/// A base chain with policy accept.
pub fn base_chain(table: &str, name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    base_chain_in(NfFamily::IP, table, name, kind, hook, prio)
}

/// A base chain of `family table` with policy accept.
pub fn base_chain_in(family: NfFamily, table: &str, name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family,
        table: table.to_string().into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

pub fn rule(table: &str, chain: &'static str, expr: Vec<Statement<'static>>, comment: String) -> Rule<'static> {
    rule_in(NfFamily::IP, table, chain, expr, comment)
}

pub fn rule_in(family: NfFamily, table: &str, chain: &'static str, expr: Vec<Statement<'static>>, comment: String) -> Rule<'static> {
    Rule {
        family,
        table: table.to_string().into(),
        chain: chain.into(),
        expr: expr.into(),
        comment: Some(comment.into()),
        ..Rule::default()
    }
}

pub fn matches(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

pub fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

/// `PROTOCOL FIELD`, e.g. `ip saddr`, `udp dport`.
pub fn field(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField { protocol: protocol.into(), field: field.into() })))
}

pub fn prefix(cidr: Cidr) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix { addr: Box::new(text(&cidr.network().to_string())), len: u32::from(cidr.prefix()) }))
}

pub fn text(s: &str) -> Expression<'static> {
    Expression::String(s.to_string().into())
}

/// An anonymous set `{ a, b, ... }` of strings (addresses).
pub fn set_of(items: impl IntoIterator<Item = String>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(items.into_iter().map(|s| SetItem::Element(text(&s))).collect()))
}

/// Applies a batch (one transaction: all of it or nothing).
pub fn apply(batch: &Nftables) -> Result<()> {
    helper::apply_ruleset(batch).map_err(error)
}

/// Deletes `table` (family `ip`) if it is there; Ok(false) if it was not.
pub fn delete_table(table: &str) -> Result<bool> {
    delete_table_in(NfFamily::IP, table)
}

/// Deletes `family table` if it is there; Ok(false) if it was not.
pub fn delete_table_in(family: NfFamily, table: &str) -> Result<bool> {
    if !table_exists_in(family, table)? {
        return Ok(false);
    }
    let mut batch = Batch::new();
    declare_and_delete_in(&mut batch, family, table);
    apply(&batch.to_nftables())?;
    Ok(true)
}

/// Whether `table` (family `ip`) is there (`nft -j list tables ip`); without
/// `nft` installed it cannot be (meshnet only ever makes it through `nft`).
pub fn table_exists(table: &str) -> Result<bool> {
    table_exists_in(NfFamily::IP, table)
}

/// Whether `family table` is there (`nft -j list tables FAMILY`).
pub fn table_exists_in(family: NfFamily, table: &str) -> Result<bool> {
    let name = if family == NfFamily::IP6 { "ip6" } else { "ip" };
    let listed = match helper::get_current_ruleset_with_args(helper::DEFAULT_NFT, ["list", "tables", name]) {
        Ok(listed) => listed,
        Err(NftablesError::NftExecution { inner, .. }) if inner.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(error(e)),
    };
    Ok(listed.objects.iter().any(|o| {
        matches!(o, NfObject::ListObject(NfListObject::Table(t)) if t.family == family && t.name == table)
    }))
}

/// Packets counted by the rules of `table` whose comment is `comment`.
pub fn counted(table: &str, comment: &str) -> Result<u64> {
    let listed = helper::get_current_ruleset_with_args(helper::DEFAULT_NFT, ["list", "table", "ip", table]).map_err(error)?;
    let mut packets = 0;
    for o in listed.objects.iter() {
        let NfObject::ListObject(NfListObject::Rule(r)) = o else { continue };
        if r.comment.as_deref() != Some(comment) {
            continue;
        }
        for st in r.expr.iter() {
            if let Statement::Counter(nftables::stmt::Counter::Anonymous(Some(c))) = st {
                packets += c.packets.unwrap_or(0) as u64;
            }
        }
    }
    Ok(packets)
}

fn error(e: NftablesError) -> anyhow::Error {
    match e {
        NftablesError::NftExecution { inner, .. } if inner.kind() == std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("cannot run nft ({inner}): nftables must be installed")
        }
        NftablesError::NftFailed { stderr, stdout, .. } => {
            let said = [stderr.trim(), stdout.trim()].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("; ");
            if said.is_empty() {
                anyhow::anyhow!("nft refused the rules (its message is in the router's log)")
            } else {
                anyhow::anyhow!("nft refused the rules: {said}")
            }
        }
        e => anyhow::anyhow!("nft: {e}"),
    }
}

//! A subject's devices: [`Devices::list_devices`], [`Devices::revoke_device`].

use serde_json::json;

use super::records::{self, key, DeviceRecord};
use super::{check_id, check_subject, emit, store_error, Caller, Devices};
use crate::audit::Details;
use crate::common::EventKind;
use crate::error::{Error, Result};
use crate::store::{Rollback, Table};

impl Devices {
    /// The subject's devices (active and revoked), in activation order.
    pub async fn list_devices(&self, tenant: &str, subject: &str) -> Result<Vec<DeviceRecord>> {
        check_subject(subject)?;
        let (tenant, subject) = (tenant.to_owned(), subject.to_owned());
        self.store
            .read(move |txn| {
                let s = records::subject(txn, &tenant, &subject).map_err(|Rollback(e)| e)?;
                records::devices_of(txn, &tenant, &s).map_err(|Rollback(e)| e)
            })
            .await
            .map_err(store_error)
    }

    /// One device of `tenant`.
    pub async fn device(&self, tenant: &str, device_id: &str) -> Result<DeviceRecord> {
        check_id("device_id", device_id)?;
        let k = key(tenant, device_id);
        self.store
            .read(move |txn| records::get(txn, Table::Devices, &k).map_err(|Rollback(e)| e))
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(device_id))
    }

    /// Revoke a device (a revoked one is answered unchanged).
    pub async fn revoke_device(&self, caller: &Caller, device_id: &str) -> Result<DeviceRecord> {
        check_id("device_id", device_id)?;
        let k = key(&caller.tenant, device_id);
        let now = self.clock.now();
        let time_ms = self.clock.now_ms();
        let audit = self.audit_event(caller, "device.revoke", device_id);
        let id = device_id.to_owned();
        self.write(move |txn| {
            let Some(mut d) = records::get::<DeviceRecord, _>(txn, Table::Devices, &k)? else {
                return Ok(Err(not_found(&id)));
            };
            if !d.active() {
                return Ok(Ok(d));
            }
            // Lock the subject's row first, as every change of its devices does.
            let _ = records::subject(txn, &d.tenant, &d.subject)?;
            d.revoked_at = now;
            records::put(txn, Table::Devices, &k, &d)?;
            audit.append(txn, Details::new().str("subject", &d.subject))?;
            emit(
                txn,
                time_ms,
                EventKind::DeviceRevoked,
                &d.tenant,
                &d.subject,
                &d.id,
                json!({}),
            )?;
            Ok(Ok(d))
        })
        .await
    }
}

/// The one answer for a device id the caller's tenant does not hold.
pub(super) fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no device {id:?}"))
}

//! The guest images droverd builds (the minimal image with the agent, and Debian images).

use super::*;

impl Manager {
    pub(super) fn agent_binary(&self) -> Result<PathBuf> {
        if let Some(p) = &self.s.cfg.agent_binary {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe().map_err(|e| HostError::Internal(e.to_string()))?;
        let dir = exe.parent().unwrap_or(Path::new("/"));
        let candidates = [
            dir.join("drover-agent-static"),
            dir.join("../x86_64-unknown-linux-gnu/release/drover-agent"),
            dir.join("../../x86_64-unknown-linux-gnu/release/drover-agent"),
            PathBuf::from("/usr/lib/drover/drover-agent"),
        ];
        candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
            HostError::ImageMissing(
                "no static drover-agent binary found to put in the guest image; build it with \
                 `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p drover-agent --target x86_64-unknown-linux-gnu` \
                 or pass droverd --agent-binary PATH"
                    .into(),
            )
        })
    }

    /// The current default guest image, if built.
    pub fn current_image(&self) -> Result<Option<ImageInfo>> {
        let loaded = drover_image::load(&self.s.cfg.image_dir)
            .map_err(|e| HostError::ImageMissing(e.to_string()))?;
        Ok(loaded.map(image_info))
    }

    /// What an image build takes from this daemon's configuration.
    pub(super) fn image_spec(&self, force: bool) -> Result<drover_image::ImageSpec> {
        Ok(drover_image::ImageSpec {
            cache_dir: self.s.cfg.image_dir.clone(),
            agent_binary: self.agent_binary()?,
            kernel_package: None,
            force,
        })
    }

    /// The current image of a distribution (`debian-12`), if built.
    pub fn current_distro_image(&self, distro: &str) -> Result<Option<ImageInfo>> {
        check_distro(distro)?;
        let loaded = drover_image::debian::load(&self.s.cfg.image_dir)
            .map_err(|e| HostError::ImageMissing(e.to_string()))?;
        Ok(loaded.map(|b| ImageInfo {
            image: self.image_get(distro).ok(),
            ..distro_image_info(b)
        }))
    }

    /// Build (or reuse) a distribution image (`debian-12`): debootstrap, the agent's package.
    pub async fn build_distro_image(
        &self,
        distro: &str,
        force: bool,
        mut progress: impl FnMut(String) + Send + 'static,
    ) -> Result<ImageInfo> {
        check_distro(distro)?;
        let _guard = self.s.image_lock.lock().await;
        let spec = self.image_spec(force)?;
        let built = tokio::task::spawn_blocking(move || {
            drover_image::debian::build(&spec, &mut |p| progress(crate::image_progress(&p)))
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::ImageMissing(format!("{distro} image build failed: {e}")))?;
        // Imported under the distribution's name, so `vm create --from-image debian-12` works.
        let boot = drover_api::ImageBoot {
            kernel: built.kernel.clone(),
            initrd: built.initrd.clone(),
            cmdline: built.manifest.cmdline.clone(),
        };
        let (image, note) = self
            .import_built(distro, &built.disk, &boot, &built.manifest.key)
            .await?;
        let mut info = distro_image_info(built);
        info.image = Some(image);
        info.note = note;
        Ok(info)
    }

    /// Build (or reuse, when inputs are unchanged) the default guest image.
    pub async fn build_image(
        &self,
        force: bool,
        mut progress: impl FnMut(String) + Send + 'static,
    ) -> Result<ImageInfo> {
        let _guard = self.s.image_lock.lock().await;
        let spec = self.image_spec(force)?;
        let built = tokio::task::spawn_blocking(move || {
            drover_image::build(&spec, &mut |p| progress(crate::image_progress(&p)))
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::ImageMissing(format!("guest image build failed: {e}")))?;
        Ok(image_info(built))
    }
}

pub(super) fn image_info(b: drover_image::BuiltImage) -> ImageInfo {
    ImageInfo {
        dir: b.dir.display().to_string(),
        kernel: b.kernel.display().to_string(),
        initrd: b.initrd.display().to_string(),
        manifest: serde_json::to_value(&b.manifest).unwrap_or_default(),
        disk: None,
        cmdline: None,
        image: None,
        note: None,
    }
}

pub(super) fn distro_image_info(b: drover_image::debian::DebianImage) -> ImageInfo {
    ImageInfo {
        dir: b.dir.display().to_string(),
        kernel: b.kernel.display().to_string(),
        initrd: b.initrd.display().to_string(),
        disk: Some(b.disk.display().to_string()),
        cmdline: Some(b.manifest.cmdline.clone()),
        manifest: serde_json::to_value(&b.manifest).unwrap_or_default(),
        image: None,
        note: None,
    }
}

/// The one distribution Drover builds images of, or an error naming it.
pub(super) fn check_distro(distro: &str) -> Result<()> {
    if distro == drover_image::debian::DISTRO {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "unknown distribution {distro:?}; Drover builds `{}`",
            drover_image::debian::DISTRO
        )))
    }
}

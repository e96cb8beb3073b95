//! Images: the guest image (show, build, inject the agent) and imported disk images
//! (tag `image`).

use crate::auth::Permission;
use crate::manager::Manager;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_api::{ApiError, ErrorCode, ImageBuildRequest, StreamItem};

use super::detached::{detached, ndjson};
use super::extract::{Body, Who, Q};
use super::gate::{need, Failure, Res};

#[utoipa::path(
    get,
    path = "/v1/image",
    tag = "image",
    summary = "The guest image (default, or ?distro=)",
    params(ImageQuery),
    responses(
        (status = 200, description = "Done", body = drover_api::ImageInfo),
    ),
)]
pub(super) async fn image(
    State(m): State<Manager>,
    who: Who,
    Q(q): Q<ImageQuery>,
) -> Res<drover_api::ImageInfo> {
    need(&who, Permission::Read)?;
    if let Some(distro) = q.distro {
        return match m.current_distro_image(&distro)? {
            Some(i) => Ok(Json(i)),
            None => Err(Failure(ApiError::new(
                ErrorCode::ImageMissing,
                format!("the {distro} image is not built yet; run `drover image build --distro {distro}`"),
            ))),
        };
    }
    match m.current_image()? {
        Some(i) => Ok(Json(i)),
        None => Err(Failure(ApiError::new(
            ErrorCode::ImageMissing,
            "the default guest image is not built yet; run `drover image build`",
        ))),
    }
}

/// `GET /v1/image?distro=debian-12`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ImageQuery {
    /// A distribution image (`debian-12`) instead of the default one.
    #[serde(default)]
    distro: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/images",
    tag = "image",
    summary = "Imported disk images",
    responses((status = 200, description = "Done", body = Vec<drover_api::DiskImage>)),
)]
pub(super) async fn images_list(
    State(m): State<Manager>,
    who: Who,
) -> Res<Vec<drover_api::DiskImage>> {
    need(&who, Permission::Read)?;
    Ok(Json(m.images()?))
}

#[utoipa::path(
    get,
    path = "/v1/images/{name}",
    tag = "image",
    summary = "One disk image",
    params(("name" = String, Path, description = "The image's name")),
    responses((status = 200, description = "Done", body = drover_api::DiskImage)),
)]
pub(super) async fn image_show(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::DiskImage> {
    need(&who, Permission::Read)?;
    Ok(Json(m.image_get(&name)?))
}

#[utoipa::path(
    post,
    path = "/v1/images",
    tag = "image",
    summary = "Import a disk image (copied in as a checked standalone qcow2)",
    request_body = drover_api::ImageImportRequest,
    responses((status = 200, description = "Done", body = drover_api::DiskImage)),
)]
pub(super) async fn image_import(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<drover_api::ImageImportRequest>,
) -> Res<drover_api::DiskImage> {
    detached(async move { m.image_import(&req, &who.0).await }).await
}

#[utoipa::path(
    delete,
    path = "/v1/images/{name}",
    tag = "image",
    summary = "Delete a disk image (refused while a VM uses it)",
    params(("name" = String, Path, description = "The image's name")),
    responses((status = 200, description = "Done", body = drover_api::DiskImage)),
)]
pub(super) async fn image_delete(
    State(m): State<Manager>,
    who: Who,
    Path(name): Path<String>,
) -> Res<drover_api::DiskImage> {
    Ok(Json(m.image_delete(&name, &who.0).await?))
}

#[utoipa::path(
    post,
    path = "/v1/image/inject-agent",
    tag = "image",
    summary = "Install the agent package offline into a stopped disk (an image no VM uses, or a file no running VM uses)",
    request_body = drover_api::InjectAgentRequest,
    responses((status = 200, description = "Done", body = drover_api::AgentInjected)),
)]
pub(super) async fn image_inject_agent(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<drover_api::InjectAgentRequest>,
) -> Res<drover_api::AgentInjected> {
    detached(async move { m.image_inject_agent(&req, &who.0).await }).await
}

/// Streams progress lines, then the result, as NDJSON.
#[utoipa::path(
    post,
    path = "/v1/image/build",
    tag = "image",
    summary = "Build the guest image: NDJSON lines of StreamItem (progress text, then the image or the error)",
    request_body = ImageBuildRequest,
    responses(
        (status = 200, description = "Done", body = StreamItem<drover_api::ImageInfo>, content_type = "application/x-ndjson"),
    ),
)]
pub(super) async fn image_build(
    State(m): State<Manager>,
    who: Who,
    Body(req): Body<ImageBuildRequest>,
) -> Response {
    if let Err(f) = need(&who, Permission::Admin) {
        return f.into_response();
    }
    ndjson(move |progress| async move {
        match req.distro {
            Some(distro) => m.build_distro_image(&distro, req.force, progress).await,
            None => m.build_image(req.force, progress).await,
        }
    })
}

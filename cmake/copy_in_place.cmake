# Copies the built library and its build info into the source tree's qlora_ext/ (QLORA_INPLACE),
# as a convenience that must not fail the build: a read-only source tree (a read-only mount, a
# shared checkout) gets a warning, and the installed package is complete without the copy.
#   cmake -DFILES="a;b" -DDEST=dir -P copy_in_place.cmake
foreach(file IN LISTS FILES)
  get_filename_component(name "${file}" NAME)
  file(COPY_FILE "${file}" "${DEST}/${name}" RESULT failed)
  if(failed)
    message(WARNING "qlora_ext: could not copy ${name} into ${DEST} (${failed}); the installed package "
                    "has it. Python started in the source folder imports that folder's qlora_ext, which "
                    "then lacks it: build with -DQLORA_INPLACE=OFF to skip the copy")
  endif()
endforeach()
